"""bh_routing.prompts: teacher-forced prompt scores against one plain forward per prompt, counts
against a single-prompt recorder, batched greedy continuations against unbatched ``generate``, the
suite's statistics against numpy, and the interleaved timing's structure."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bh_routing import prompts as bp
from bh_routing.prompt_sets import prompt_set
from bh_routing.evaluation import encode, prefix_token_id
from bh_routing.patching import RoutingPatch
from conftest import needs_tiny

pytestmark = [pytest.mark.usefixtures("offline_hub"), needs_tiny]

NATIVE = {"strategy": "topk", "k": 8}
VARIABLE_K = {"strategy": "bh", "alpha": 0.05, "pvalues": "zscore"}   # 1..8 experts per token, no calibration


@pytest.fixture(scope="module")
def tiny():
    from bh_routing.models import load_model
    return load_model("tiny", device="cpu", dtype="float32", verbose=False)


def _reference(model, tokenizer, text: str, config: dict | None):
    """One unbatched forward of [prefix] + the prompt's tokens but the last — the unpatched model when
    ``config`` is None, else alone under a RoutingPatch — -> (nll, counts [L, n] | None, experts | None)."""
    ids = [prefix_token_id(tokenizer)] + encode(tokenizer, [text])[0]
    inputs = torch.tensor([ids[:-1]])
    targets = torch.tensor(ids[1:])
    with torch.no_grad():
        if config is None:
            logits, counts, experts = model(input_ids=inputs).logits[0].float(), None, None
        else:
            with RoutingPatch(model, config, verbose=False) as patch:
                logits = model(input_ids=inputs).logits[0].float()
                arrays = patch.recorder.arrays()
            counts, experts = arrays["count"].astype(np.int64), arrays["experts"].astype(np.int64)
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return float(-logp.double().mean()), counts, experts


@pytest.mark.parametrize("config", [NATIVE, VARIABLE_K], ids=["native", "bh"])
def test_scores_equal_one_plain_forward_per_prompt(tiny, config):
    model, tokenizer = tiny
    prompts = prompt_set("categories")
    scores = bp.score_prompts(model, tokenizer, prompts, config, progress=False)
    for prompt, row in zip(prompts, scores.table.itertuples()):
        nll, counts, experts = _reference(model, tokenizer, prompt["prompt"], config)
        native_nll, _, _ = _reference(model, tokenizer, prompt["prompt"], None)
        assert row.nll == pytest.approx(nll, abs=1e-5)
        if config is NATIVE:   # top-8 under the patch is the model itself
            assert row.nll == pytest.approx(native_nll, abs=1e-5)
        n = len(encode(tokenizer, [prompt["prompt"]])[0])
        assert row.n_tokens == n and len(scores.tokens[prompt["id"]]) == n
        np.testing.assert_array_equal(scores.counts[prompt["id"]], counts)
        k = experts.shape[2]
        np.testing.assert_array_equal(scores.experts[prompt["id"]][:, :, :k], experts)
        assert (scores.experts[prompt["id"]][:, :, k:] == -1).all()
        assert row.mean_experts == pytest.approx(counts.mean())
        min_k = 8 if config is NATIVE else 1    # top-k: floor and ceiling are both k
        assert row.floor_rate == pytest.approx((counts == min_k).mean())
        assert row.ceiling_rate == pytest.approx((counts == 8).mean())
    if config is VARIABLE_K:
        assert scores.table["mean_experts"].lt(8).all() and scores.table["floor_rate"].gt(0).all()


def test_batched_greedy_continuations_equal_unbatched_generate(tiny):
    model, tokenizer = tiny
    prompts = prompt_set("categories")
    scores = bp.score_prompts(model, tokenizer, prompts, VARIABLE_K, new_tokens=6, progress=False)
    lengths = {len(ids) for ids in encode(tokenizer, [p["prompt"] for p in prompts])}
    assert len(lengths) > 1   # the batch really is left-padded
    with torch.no_grad(), RoutingPatch(model, VARIABLE_K, record=False, verbose=False):
        for prompt, row in zip(prompts, scores.table.itertuples()):
            ids = torch.tensor([encode(tokenizer, [prompt["prompt"]])[0]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert row.continuation == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), prompt["id"]
            assert 1 <= row.mean_experts_prompt <= 8 and 1 <= row.mean_experts_generated <= 8
    assert scores.generation["generated_tokens"] == 6 * len(prompts)


def test_statistics_equal_numpy_on_the_counts(tiny):
    model, tokenizer = tiny
    scores = bp.score_prompts(model, tokenizer, prompt_set("categories"), VARIABLE_K, progress=False)
    stats = bp.prompt_statistics(scores, model.config.num_experts)
    counts = np.concatenate(list(scores.counts.values()), axis=1)       # [L, T]
    per_token = counts.mean(axis=0)
    assert stats["n_tokens"] == counts.shape[1] == scores.table["n_tokens"].sum() and stats["n_prompts"] == 12
    assert stats["experts_mean"] == pytest.approx(per_token.mean())
    assert stats["experts_std"] == pytest.approx(per_token.std(ddof=1))
    assert (stats["experts_min"], stats["experts_max"]) == (per_token.min(), per_token.max())
    assert (stats["layer_mean_min"], stats["layer_mean_max"]) == pytest.approx(
        (counts.mean(axis=1).min(), counts.mean(axis=1).max()))
    assert stats["floor_rate"] == pytest.approx((counts == 1).mean())
    assert stats["ceiling_rate"] == pytest.approx((counts == 8).mean())
    load = np.zeros((counts.shape[0], model.config.num_experts))
    for experts in scores.experts.values():
        for layer in range(counts.shape[0]):
            chosen = experts[layer][experts[layer] >= 0]
            np.add.at(load[layer], chosen, 1)
    assert load.sum() == counts.sum()
    assert stats["load_cv_per_layer"] == pytest.approx(list(load.std(axis=1) / load.mean(axis=1)))
    assert stats["load_cv"] == pytest.approx((load.std(axis=1) / load.mean(axis=1)).mean())
    assert stats["dead_experts"] == int((load == 0).sum())
    with np.errstate(divide="ignore"):
        assert stats["load_max_min_ratio"] == pytest.approx((load.max(axis=1) / load.min(axis=1)).mean())


def test_compare_prompts_is_a_paired_t_over_prompts(tiny):
    from scipy import stats
    model, tokenizer = tiny
    prompts = prompt_set("categories")
    native = bp.score_prompts(model, tokenizer, prompts, NATIVE, label="native", progress=False)
    bh = bp.score_prompts(model, tokenizer, prompts, VARIABLE_K, label="bh", progress=False)
    tests = bp.compare_prompts(native, bh).set_index("metric")
    assert list(tests.index) == ["mean_experts", "nll"] and (tests["n"] == 12).all()
    assert tests.loc["nll", "t_pvalue"] == pytest.approx(stats.ttest_rel(bh.table["nll"], native.table["nll"]).pvalue)


@pytest.mark.parametrize("prompts, message", [([], "non-empty list"), ("a prompt", "non-empty list"),
                                              ([{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}], "unique"),
                                              ([{"id": "x", "prompt": ""}], "encode to no tokens")])
def test_bad_prompts_are_refused_before_any_work(tiny, prompts, message):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        bp.score_prompts(model, tokenizer, prompts, NATIVE, progress=False)


def test_timing_interleaves_rounds_after_a_warm_up(tiny):
    model, tokenizer = tiny
    configs = {"native top-8": NATIVE, "top-2": {"strategy": "topk", "k": 2}, "BH": VARIABLE_K}
    timing = bp.time_routings(model, tokenizer, configs, prompts=prompt_set("baseline"), new_tokens=3, repeats=3)
    assert [r["order"] for r in timing["rounds"]] == [["native top-8", "top-2", "BH"], ["top-2", "BH", "native top-8"],
                                                      ["BH", "native top-8", "top-2"]]
    by_label = {c["label"]: c for c in timing["configs"]}
    for label, result in by_label.items():
        rates = [3 * 3 / r["seconds"][label] for r in timing["rounds"]]
        assert result["tokens_per_s"] == pytest.approx(rates)
        assert result["median_tokens_per_s"] == pytest.approx(np.median(rates))
    assert by_label["native top-8"]["mean_experts"] == 8.0 and by_label["top-2"]["mean_experts"] == 2.0
    assert 1 <= by_label["BH"]["mean_experts"] < 8
    assert timing["machine"]["torch_threads"] == torch.get_num_threads() and timing["device"] == "cpu"
    with pytest.raises(ValueError, match="repeats"):
        bp.time_routings(model, tokenizer, configs, repeats=0)


# --------------------------------------------------------------------------- the sweep's prompt task and its report


@pytest.fixture(scope="module")
def prompt_sweep(tiny, tmp_path_factory):
    from bh_routing import experiments as ex
    from bh_routing.store import write_json
    model, tokenizer = tiny
    folder = tmp_path_factory.mktemp("prompt-sweep")
    configs = [("native top-8", NATIVE), ("top-2", {"strategy": "topk", "k": 2}), ("BH zscore", VARIABLE_K)]
    runs = ([ex.Run(label, config, "prompts", new_tokens=2) for label, config in configs]
            + [ex.Run(label, config, "wikitext", 1, max_length=64) for label, config in configs])
    context = ex.SweepContext(model, tokenizer, "tiny")
    records = ex.run_sweep(context, runs, folder, progress=False)
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    timing = bp.time_routings(model, tokenizer, dict(configs), new_tokens=2, repeats=2)
    write_json(folder / bp.LATENCY_FILE, {**timing, "context": context.describe()})
    return folder, records


def test_saved_prompt_stats_equal_numpy_on_the_saved_arrays(prompt_sweep, tiny):
    folder, records = prompt_sweep
    num_experts = tiny[0].config.num_experts
    for record in (r for r in records if r["task"] == "prompts"):
        saved = np.load(folder / "runs" / f"{record['run_id']}.npz")
        counts, experts = saved["counts"].astype(np.int64), saved["experts"].astype(np.int64)   # [L, T], [L, T, K]
        stats, per_token = record["prompt_stats"], counts.mean(axis=0)
        assert stats["n_tokens"] == counts.shape[1] == len(saved["prompt"]) and stats["n_prompts"] == 12
        assert [stats[k] for k in ("experts_mean", "experts_std", "experts_min", "experts_max")] == pytest.approx(
            [per_token.mean(), per_token.std(ddof=1), per_token.min(), per_token.max()])
        load = np.stack([np.bincount(experts[layer][experts[layer] >= 0], minlength=num_experts)
                         for layer in range(counts.shape[0])])                               # [L, N]
        assert stats["load_cv"] == pytest.approx((load.std(axis=1) / load.mean(axis=1)).mean())
        with np.errstate(divide="ignore"):
            assert stats["load_max_min_ratio"] == pytest.approx((load.max(axis=1) / load.min(axis=1)).mean())
        assert record["experts"]["mean_experts"] == pytest.approx(counts.mean())
        assert [row["nll"] for row in record["prompts"]] == pytest.approx(
            [_reference(*tiny, p["prompt"], record["routing"])[0] for p in prompt_set("categories")], abs=1e-5)


def test_report_shows_the_prompt_statistics_and_the_figures(prompt_sweep, tmp_path):
    import pandas as pd
    from bh_routing.report import build_report
    folder, records = prompt_sweep
    report = build_report(folder)
    path = report.write(tmp_path)
    markdown = path.read_text()
    assert "## Prompt suite: experts per token and expert load" in markdown and "n = 12 prompts" in markdown
    table = pd.read_csv(tmp_path / "prompt_stats.csv").set_index("label")
    for record in (r for r in records if r["task"] == "prompts"):
        assert table.loc[record["label"], "load_cv"] == pytest.approx(record["prompt_stats"]["load_cv"])
        assert table.loc[record["label"], "n_tokens"] == record["prompt_stats"]["n_tokens"]
    assert table.loc["native top-8", "experts_std"] == 0 and table.loc["top-2", "experts_max"] == 2
    for name in ("reduction", "load_cv", "experts_vs_latency"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000, name
        assert f"]({name}.png)" in markdown, name
    assert "## Latency (interleaved timing)" in markdown and "latency.json" in markdown
    assert "2 interleaved rounds" in markdown


def test_latency_of_another_context_is_not_shown(prompt_sweep, tmp_path):
    import json
    import shutil
    from bh_routing.report import build_report
    folder, _ = prompt_sweep
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    latency = json.loads((copy / bp.LATENCY_FILE).read_text())
    latency["context"]["weights_fingerprint"] = "other"
    (copy / bp.LATENCY_FILE).write_text(json.dumps(latency))
    report = build_report(copy)
    assert report.latency is None and not any(f.name == "experts_vs_latency" for f in report.figures)
    assert any("another context" in note for note in report.notes)
    (copy / bp.LATENCY_FILE).unlink()
    assert not any(f.name == "experts_vs_latency" for f in build_report(copy).figures)
