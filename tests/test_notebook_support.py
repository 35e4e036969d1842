"""bh_routing.notebook_support: every number the notebooks show, checked against an independent
reference (plain loops, scipy, statsmodels, scikit-learn, transformers' own outputs)."""
from __future__ import annotations

import itertools
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bh_routing import experiments as ex
from bh_routing import notebook_support as nbs
from bh_routing.models import TINY_MODEL_DIR
from bh_routing.pvalues import Calibration, compute_pvalues
from bh_routing.selection import route

needs_tiny = pytest.mark.skipif(not (Path(TINY_MODEL_DIR) / "model.safetensors").exists(),
                                reason="the bundled tiny OLMoE (bh_routing/assets/tiny-olmoe) is not in this checkout")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def make_sample(layers=3, tokens=400, experts=16, top_k=4, seed=0, sources=("a", "b")) -> nbs.RoutingSample:
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(layers, experts, generator=g)  # experts with different base rates, like a trained router
    logits = [torch.randn(tokens, experts, generator=g) * (0.5 + l) + bias[l] for l in range(layers)]
    source = np.array([sources[i % len(sources)] for i in range(tokens)], dtype=object)
    return nbs.RoutingSample(logits, np.arange(tokens) % 50, source, np.arange(tokens) // 20, np.arange(tokens) % 20, top_k)


# --------------------------------------------------------------------------- native routing statistics


def test_routing_statistics_match_a_per_token_loop():
    sample = make_sample()
    stats = nbs.routing_statistics(sample)
    n, k = sample.num_experts, sample.top_k
    for layer, logits in enumerate(sample.logits):
        x = logits.double().numpy()
        probs = np.exp(x - x.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        top1, entropy, mass, load = [], [], [], np.zeros(n)
        for row in probs:
            order = sorted(range(n), key=lambda e: -row[e])
            top1.append(row[order[0]])
            entropy.append(-sum(p * math.log(p) for p in row))
            mass.append(sum(row[e] for e in order[:k]))
            for e in order[:k]:
                load[e] += 1
        mean_load = load.mean()
        gini = np.abs(load[:, None] - load[None, :]).sum() / (2 * n * n * mean_load)
        row = stats.iloc[layer]
        assert row["max_weight_mean"] == pytest.approx(np.mean(top1), rel=1e-9)
        assert row["max_weight_median"] == pytest.approx(np.median(top1), rel=1e-9)
        assert row["entropy_nats"] == pytest.approx(np.mean(entropy), rel=1e-9)
        assert row["entropy_norm"] == pytest.approx(np.mean(entropy) / math.log(n), rel=1e-9)
        assert row["topk_mass"] == pytest.approx(np.mean(mass), rel=1e-9)
        assert row["mass_left_out"] == pytest.approx(1 - np.mean(mass), rel=1e-9)
        assert row["top_expert"] == int(load.argmax())
        assert row["top_expert_usage"] == pytest.approx(load.max() / len(probs))
        assert row["dead_experts"] == int((load == 0).sum())
        assert row["load_cv"] == pytest.approx(load.std() / mean_load, rel=1e-9)
        assert row["load_gini"] == pytest.approx(gini, rel=1e-9)
        assert row["logit_std"] == pytest.approx(x.std(ddof=1), rel=1e-6)


def test_concentration_and_usage_match_sorting():
    sample = make_sample(layers=2)
    conc = nbs.concentration(sample, ks=(1, 2, 4))
    usage = nbs.expert_usage(sample)
    for layer, logits in enumerate(sample.logits):
        probs = torch.softmax(logits.double(), -1).numpy()
        ordered = -np.sort(-probs, axis=1)
        for k in (1, 2, 4):
            got = conc[(conc.layer == layer) & (conc.k == k)].iloc[0]
            assert got["mass"] == pytest.approx(ordered[:, :k].sum(axis=1).mean(), rel=1e-9)
            assert got["uniform"] == k / sample.num_experts
        expected = np.zeros(sample.num_experts, dtype=int)
        for row in probs:
            expected[np.argsort(-row, kind="stable")[:sample.top_k]] += 1
        np.testing.assert_array_equal(usage[layer], expected)


def test_coactivation_pairs_match_set_counting():
    sample = make_sample(layers=1, tokens=600, experts=12, top_k=3)
    pairs = nbs.coactivation_pairs(sample, 0, n=200, min_tokens=1)
    chosen = [set(np.argsort(-row, kind="stable")[:3].tolist()) for row in torch.softmax(sample.logits[0], -1).numpy()]
    tokens = len(chosen)
    expected = {}
    for i, j in itertools.combinations(range(12), 2):
        both = sum(1 for s in chosen if i in s and j in s)
        load_i, load_j = sum(i in s for s in chosen), sum(j in s for s in chosen)
        if both:
            expected[(i, j)] = (both, both / (load_i + load_j - both), both * tokens / (load_i * load_j))
    assert len(pairs) == len(expected)
    for row in pairs.itertuples():
        both, jaccard, lift = expected[(row.expert_i, row.expert_j)]
        assert row.together == both
        assert row.jaccard == pytest.approx(jaccard)
        assert row.lift == pytest.approx(lift)
    assert list(pairs["lift"]) == sorted(pairs["lift"], reverse=True)


def test_mutual_information_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.choice(["x", "y", "z"], 5000)
    experts = (rng.integers(0, 16, 5000) + (labels == "x") * 3) % 16
    got = nbs._mutual_information_bits(labels, experts, 16)
    assert got == pytest.approx(metrics.mutual_info_score(labels, experts) / math.log(2), rel=1e-9)


def test_domain_specialisation_separates_sources_that_use_different_experts():
    tokens, experts = 512, 16
    logits = torch.full((tokens, experts), -5.0)
    source = np.array(["a"] * (tokens // 2) + ["b"] * (tokens // 2), dtype=object)
    logits[: tokens // 2, :4] = 5.0  # source a uses experts 0-3, b uses 8-11: top-4 identifies the source
    logits[tokens // 2:, 8:12] = 5.0
    logits += torch.randn(tokens, experts, generator=torch.Generator().manual_seed(1)) * 0.01
    sample = nbs.RoutingSample([logits], np.zeros(tokens, int), source, np.zeros(tokens, int), np.arange(tokens), 4)
    spec = nbs.domain_specialisation(sample, min_tokens=8)
    assert spec.loc[0, "mi_bits"] == pytest.approx(1.0, abs=1e-9)  # H(source) = 1 bit, fully determined
    assert spec.loc[0, "mi_norm"] == pytest.approx(1.0, abs=1e-9)
    assert spec.loc[0, "mi_shuffled_bits"] < 0.05
    usage = nbs.domain_usage(sample, 0)
    np.testing.assert_allclose(usage.loc["a"].to_numpy()[:4], 0.25)
    np.testing.assert_allclose(usage.loc["all"].to_numpy()[[0, 8]], 0.125)
    assert list(nbs.domain_usage(sample, 0, min_tokens=tokens // 2 + 1).index) == ["all"]   # too short: left out
    top = nbs.specialised_experts(sample, n=3, min_tokens=8)
    np.testing.assert_allclose(top["lift"], 2.0)  # P(e | a) = 1/4, P(e) = 1/8


def test_token_view_and_select():
    sample = make_sample(layers=2, tokens=60)

    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"
    view = nbs.token_view(sample, Tok(), text=1)
    keep = np.flatnonzero(sample.text == 1)
    assert len(view) == 2 * keep.size
    probs = torch.softmax(sample.logits[1][torch.as_tensor(keep)].double(), -1)
    layer1 = view[view.layer == 1]
    np.testing.assert_allclose(layer1["top1_prob"], probs.max(dim=1).values.numpy())
    np.testing.assert_array_equal(layer1["top1_expert"], probs.argmax(dim=1).numpy())
    sub = sample.select(sample.source == "a")
    assert sub.num_tokens == (sample.source == "a").sum()
    torch.testing.assert_close(sub.logits[0], sample.logits[0][torch.as_tensor(np.flatnonzero(sample.source == "a"))])


def test_describe_baseline_numbers_come_from_the_tables():
    sample = make_sample()
    stats, conc = nbs.routing_statistics(sample), nbs.concentration(sample, (1, 2, 4))
    lines = nbs.describe_baseline(stats, conc, None, sample.num_experts, sample.top_k, model_id="tiny")
    assert "2.6 M-parameter pipeline model" in lines[0]                      # the model named for what it is
    assert f"{stats['max_weight_mean'].mean():.3f}" in lines[1]
    assert f"{stats['max_weight_mean'].mean() * sample.num_experts:.1f}× the" in lines[1]
    assert f"{stats['topk_mass'].mean():.1%}" in lines[2]
    assert f"{int(stats['dead_experts'].sum())}" in lines[5]


# --------------------------------------------------------------------------- BH explained


def _random_calibration(layers=2, experts=64, tokens=6000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(tokens, experts, generator=g) + torch.linspace(-1, 1, experts) for _ in range(layers)]
    return Calibration.from_router_logits(logits, top_k=8), logits


@pytest.mark.parametrize("procedure", ["bh", "by"])
@pytest.mark.parametrize("pvalues", ["empirical", "zscore", "pooled"])
def test_bh_explain_matches_statsmodels(procedure, pvalues):
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    calibration, _ = _random_calibration()
    g = torch.Generator().manual_seed(3)
    checked = 0
    for t in range(40):
        row = torch.randn(64, generator=g) + torch.linspace(-1, 1, 64)
        strong = torch.randperm(64, generator=g)[:t % 11]
        row[strong] += 3.0 + torch.rand(len(strong), generator=g) * 3  # 0-10 clearly relevant experts
        alpha = (0.01, 0.05, 0.2)[t % 3]
        e = nbs.bh_explain(row, 1, alpha, pvalues, calibration, procedure=procedure, min_k=1, max_k=8)
        p = compute_pvalues(row[None], pvalues, 1, calibration)[0].double().numpy()
        reject = multitest.multipletests(p, alpha=alpha, method=f"fdr_{procedure}")[0]
        assert e.k_star == int(reject.sum())
        assert set(e.table.loc[e.table["bh"], "expert"]) == set(np.flatnonzero(reject))
        assert e.router_agrees
        assert e.k_selected == min(max(e.k_star, 1), 8)
        assert list(e.table["pvalue"]) == sorted(e.table["pvalue"])
        routing = route(row[None], {"strategy": procedure, "alpha": alpha, "pvalues": pvalues, "max_k": 8}, layer=1,
                        calibration=calibration)
        assert set(e.table.loc[e.table["selected"], "expert"]) == set(routing.indices[0, :int(routing.counts[0])].tolist())
        checked += 1 <= e.k_star <= 8
    assert checked >= 5  # the cases that are not just the floor were exercised


def test_pvalue_diagnostics_and_alpha_curve():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    calibration, logits = _random_calibration()
    fresh = [l[:300] for l in _random_calibration(seed=5)[1]]
    table, smallest = nbs.pvalue_diagnostics(fresh, calibration, alpha=0.05)
    assert set(table["pvalues"]) == {"softmax", "pooled", "empirical", "zscore"}
    softmax = table[table["pvalues"] == "softmax"]
    assert (softmax["reach_rate"] == 0).all() and (softmax["floor_rate"] == 1).all()  # 1 - prob ~ 0.98 > alpha/N
    row = table[(table["pvalues"] == "empirical") & (table["layer"] == 0)].iloc[0]
    p = compute_pvalues(fresh[0], "empirical", 0, calibration).double().numpy()
    raw = [multitest.multipletests(r, alpha=0.05, method="fdr_bh")[0].sum() for r in p]
    assert row["bh_k_raw"] == pytest.approx(np.mean(raw))
    assert row["reach_rate"] == pytest.approx((p.min(axis=1) <= 0.05 / 64).mean())
    assert smallest["empirical"].shape == (2 * 300,)
    curve = nbs.alpha_curve(fresh, calibration, alphas=(0.01, 0.05, 0.2, 0.5), models=("empirical", "zscore"))
    for (model, layer), frame in curve.groupby(["pvalues", "layer"]):
        assert frame.sort_values("alpha")["mean_experts"].is_monotonic_increasing
    one = curve[(curve.pvalues == "zscore") & (curve.alpha == 0.2) & (curve.layer == 1)].iloc[0]
    counts = route(fresh[1], {"strategy": "bh", "pvalues": "zscore", "alpha": 0.2}, layer=1).counts
    assert one["mean_experts"] == pytest.approx(counts.float().mean().item())
    reach = nbs.first_alpha_reaching(curve, 2.0)
    for r in reach.itertuples():
        means = curve[curve.pvalues == r.pvalues].groupby("alpha")["mean_experts"].mean()
        hit = means[means >= 2.0]
        assert (math.isnan(r.alpha) and hit.empty) or r.alpha == hit.index.min()


def test_subsample_keeps_the_same_tokens_in_every_layer():
    layers = [torch.arange(100.0)[:, None].expand(100, 4) + 1000 * l for l in range(3)]
    sub = nbs.subsample(layers, 10, seed=1)
    assert all(s.shape == (10, 4) for s in sub)
    np.testing.assert_array_equal(sub[0][:, 0].numpy() + 2000, sub[2][:, 0].numpy())
    assert nbs.subsample(layers, 500) == layers


# --------------------------------------------------------------------------- sweep tables


def _runs_frame():
    rows = []
    for task, metric, values in (("wikitext", "word_perplexity", (10.0, 12.0, 11.0, 13.0)),
                                 ("hellaswag", "acc_norm", (0.5, 0.4, 0.45, 0.3)),
                                 ("lambada", "acc", (0.6, 0.5, 0.55, 0.4))):
        for (label, group, strategy, k, experts, target), value in zip(
                [("top-8", "top-k", "topk", 8, 8.0, None), ("top-4", "top-k", "topk", 4, 4.0, None),
                 ("BH α=0.05 max_k=8", "adaptive", "bh", None, 5.0, None),
                 ("BH empirical @k̄=4", "matched k=4", "bh", None, 4.1, 4.0)],
                values):
            rows.append({"label": label, "group": group, "strategy": strategy, "k": k, "task": task, "status": "ok",
                         "pvalues": "empirical" if strategy == "bh" else None, "target_k": target,
                         "mean_experts": experts + (0.1 if task == "lambada" and strategy == "bh" else 0),
                         "floor_rate": 0.1 if strategy == "bh" else 1.0, "ceiling_rate": 0.2, metric: value})
    return pd.DataFrame(rows)


def test_comparison_and_matched_tables():
    runs = _runs_frame()
    main = runs[runs["target_k"].isna()]
    table = nbs.comparison_table(main)
    assert list(table["label"]) == ["BH α=0.05 max_k=8", "top-4", "top-8"]
    bh = table.set_index("label").loc["BH α=0.05 max_k=8"]
    assert bh["mean_experts"] == pytest.approx((5.0 + 5.0 + 5.1) / 3)
    assert (bh["wikitext_word_perplexity"], bh["hellaswag_acc_norm"], bh["lambada_acc"]) == (11.0, 0.45, 0.55)
    matched = nbs.matched_table(runs)            # found by the runs' target_k, not by their group names
    assert set(matched["family"]) == {"BH empirical", "top-k"}
    assert matched.set_index("family").loc["top-k", "word_perplexity"] == 12.0  # top-4 from the preset


def test_representative_runs_mix_tasks_and_strategies():
    runs = ex.full_experiments(ex.BUDGETS["smoke"])
    mix = nbs.representative_runs(runs, limit=8)
    assert len(mix) == 8 and {r.task for r in mix} == {"wikitext", "hellaswag", "lambada"}
    assert len({(r.task, r.routing["strategy"]) for r in mix}) == 8


def test_new_runs_drop_repeats_of_the_preset():
    budget = ex.BUDGETS["smoke"]
    preset = ex.full_experiments(budget)
    extra = [ex.Run("top-4", {"strategy": "topk", "k": 4}, "wikitext", budget.n_for("wikitext"), max_length=budget.max_length,
                    group="matched k=4"),
             ex.Run("x", {"strategy": "top_p", "p": 0.123, "max_k": 8}, "wikitext", budget.n_for("wikitext"),
                    max_length=budget.max_length, group="matched k=4")]
    assert [r.label for r in nbs.new_runs(preset, extra)] == ["x"]
    assert len(nbs.matched_runs_for_estimate(budget)) == 4 * nbs.MATCHED_STRATEGIES


@needs_tiny
def test_run_tokens_equal_what_the_evaluator_feeds_the_model():
    from bh_routing.evaluation import evaluate
    from bh_routing.models import load_model
    model, tokenizer = load_model("tiny", verbose=False)
    for task, n in (("lambada", 4), ("hellaswag", 3)):
        run = ex.Run("native", {"strategy": "topk", "k": 8}, task, n, max_length=64)
        result = evaluate(model, tokenizer, task, n=n, max_length=64)
        assert nbs.run_tokens(run, tokenizer) == result.config["scoring"]["input_tokens"]
    estimate = nbs.estimate_sweep([run, run], tokenizer, tokens_per_s=100.0)
    assert estimate["tokens"].iloc[0] == 2 * result.config["scoring"]["input_tokens"]
    assert estimate["seconds"].iloc[0] == pytest.approx(estimate["tokens"].iloc[0] / 100.0)


# --------------------------------------------------------------------------- with a model


@needs_tiny
def test_record_native_routing_equals_transformers_router_logits():
    from bh_routing.models import load_model
    model, tokenizer = load_model("tiny", verbose=False)
    texts = {"one": ["The cat sat on the mat.", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12"], "two": ["def f(x):\n    return x"]}
    sample = nbs.record_native_routing(model, tokenizer, texts, max_length=8, batch_size=3, progress=False)
    rows = 0
    for text_index in np.unique(sample.text):  # each window alone, unpadded, through transformers' own router output
        keep = np.flatnonzero(sample.text == text_index)
        ids = torch.tensor(sample.token_ids[keep])[None]
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
        for layer, reference in enumerate(out.router_logits):
            torch.testing.assert_close(sample.logits[layer][torch.as_tensor(keep)], reference.float(), atol=1e-5, rtol=1e-5)
        rows += keep.size
    assert rows == sample.num_tokens
    assert set(sample.source) == {"one", "two"}
    capped = nbs.record_native_routing(model, tokenizer, texts, max_length=8, max_tokens_per_source=5, progress=False)
    assert (pd.Series(capped.source).value_counts() <= 5).all()


@needs_tiny
def test_score_prompts_patch_vs_analyze_and_reroute():
    from bh_routing.data import prompt_set
    from bh_routing.models import load_model
    model, tokenizer = load_model("tiny", verbose=False)
    prompts = prompt_set("baseline")
    native = nbs.score_prompts(model, tokenizer, prompts, {"strategy": "topk", "k": 8}, progress=False)
    for row in native.table.itertuples():
        ids = tokenizer(next(p["prompt"] for p in prompts if p["id"] == row.id), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        nll = -torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).mean().item()
        assert row.nll == pytest.approx(nll, rel=1e-5)
        assert row.mean_experts == 8.0 and row.n_tokens == ids.shape[1]
    bh = nbs.score_prompts(model, tokenizer, prompts, {"strategy": "bh", "alpha": 0.05, "pvalues": "zscore"},
                           label="bh", new_tokens=3, progress=False)
    assert (bh.table["mean_experts"] < 8).all() and bh.table["continuation"].map(len).gt(0).all()
    counts = bh.counts[prompts[0]["id"]]
    assert counts.shape == (model.config.num_hidden_layers, len(bh.tokens[prompts[0]["id"]]))
    assert bh.table.iloc[0]["floor_rate"] == pytest.approx((counts == 1).mean())
    load = bh.load(model.config.num_experts)
    assert load.sum() == sum(c.sum() for c in bh.counts.values())
    tests = nbs.compare_prompts(native, bh)
    assert list(tests["metric"]) == ["mean_experts", "nll"] and (tests["n"] == 3).all()
    modes = nbs.patch_vs_analyze(model, tokenizer, prompts[2]["prompt"], {"strategy": "bh", "alpha": 0.05, "pvalues": "zscore"})
    assert modes["max_abs_diff_analyze"] == 0.0 and modes["max_abs_diff_restored"] == 0.0
    assert modes["max_abs_diff_patch"] > 0.0
    fig, info = nbs.reroute(model, tokenizer, prompts[1]["prompt"], None, 0.05, 1.0, "zscore")
    assert 1 <= info["mean_experts"] <= 8 and len(info["next_bh"]) == 5


@needs_tiny
def test_load_or_calibrate_saves_then_reuses(tmp_path):
    from bh_routing.models import load_model
    model, tokenizer = load_model("tiny", verbose=False)
    session = nbs.start_session("02", model="tiny", budget="smoke", out=tmp_path, seed=0)
    assert session.folder == tmp_path / "02_bh_deep_dive" / "tiny_smoke" and session.folder.is_dir()
    first, logits, how = nbs.load_or_calibrate(session, model, tokenizer, need_logits=True)
    assert "calibrated now" in how and session.calibration_path.exists()
    second, again, how = nbs.load_or_calibrate(session, model, tokenizer, need_logits=True, progress=False)
    assert how.startswith("loaded from")
    for a, b in zip(logits, again):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(first.empirical, second.empirical)
    summary = nbs.calibration_summary(second)
    assert (summary["smallest_p"] == 1 / (summary["null_min"] + 1)).all()


# --------------------------------------------------------------------------- sessions and results


def test_session_resolution(tmp_path):
    assert nbs.resolve_model("auto", cuda=False) == "tiny"
    assert nbs.resolve_model("auto", cuda=True) == "allenai/OLMoE-1B-7B-0924"
    assert nbs.resolve_budget("auto", cuda=False) == "demo" and nbs.resolve_budget("auto", cuda=True) == "colab"
    with pytest.raises(ValueError):
        nbs.resolve_budget("huge")
    assert nbs.slug("allenai/OLMoE-1B-7B-0924") == "allenai-OLMoE-1B-7B-0924"
    session = nbs.start_session("01", model="allenai/OLMoE-1B-7B-0924", budget="colab", out=tmp_path, seed=3)
    assert session.plan is not None  # the built-in config plans offline
    assert session.folder.name == "allenai-OLMoE-1B-7B-0924_colab"
    assert "Memory plan" in session.markdown() and json.dumps(session.describe(), default=str)
    plan = nbs.t4_memory_plan()
    assert plan.fits and 12.5 < plan.weight_bytes / 2**30 < 13.5


def test_markdown_table_zip_and_download(tmp_path):
    frame = pd.DataFrame({"a": [1, 123456], "b": [0.123456, float("nan")], "c": ["x|y", None], "d": [True, False]})
    text = nbs.markdown_table(frame, digits=3)
    assert text.splitlines()[0] == "| a | b | c | d |"
    assert "| 1 | 0.123 | x\\|y | yes |" in text and "| 123,456 | – | – | no |" in text
    assert nbs.markdown_table(frame.iloc[:0]) == "_(no rows)_\n"
    folder = tmp_path / "results"
    (folder / "runs").mkdir(parents=True)
    (folder / "a.csv").write_text("x\n1\n")
    (folder / "fig.png").write_bytes(b"png")
    (folder / "runs" / "big.npz").write_bytes(b"0" * 100)
    (folder / "runs" / "r.json").write_text("{}")
    archive = nbs.zip_folder(folder)
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["results/a.csv", "results/fig.png"]
    assert "not on Colab" in nbs.offer_download(archive)
    report = nbs.write_report(folder / "R.md", "Title", None, ["## A", "text"], [("fig.png", "a figure")])
    assert report.read_text().startswith("# Title") and "![a figure](fig.png)" in report.read_text()
    assert nbs.read_csv(folder / "missing.csv").empty and nbs.format_duration(4000) == "67 min"


def test_figures_render(tmp_path):
    sample = make_sample()
    calibration, _ = _random_calibration()
    row = torch.randn(64, generator=torch.Generator().manual_seed(0)) + torch.linspace(-1, 1, 64)
    explanation = nbs.bh_explain(row, 0, 0.05, "empirical", calibration)
    _, smallest = nbs.pvalue_diagnostics([row[None].repeat(20, 1)], calibration)
    figures = [nbs.plot_logit_distributions(sample), nbs.plot_entropy_across_layers(sample),
               nbs.plot_concentration(nbs.concentration(sample, (1, 2))), nbs.plot_mass_left_out(sample),
               nbs.plot_domain_usage(nbs.domain_usage(sample, 0), 0), nbs.plot_bh_explained(explanation),
               nbs.plot_smallest_pvalues(smallest, 0.05, 64), nbs.plot_count_heatmap(["a", "b"], np.array([[1, 2], [3, 4]]))]
    for i, fig in enumerate(figures):
        path = nbs.show(fig, tmp_path / f"f{i}.png")
        assert path.stat().st_size > 1000
