"""Experiment engine: checkpoint/resume (a real killed subprocess), matched compute, reports, the demo."""
import hashlib
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bh_routing import experiments as ex, matching
from bh_routing import route
from bh_routing.store import ResultStore
from conftest import needs_tiny

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}


def test_store_drops_a_torn_last_line_and_keeps_finished_runs(tmp_path):
    store = ResultStore(tmp_path)
    store.append({"run_id": "a", "status": "ok", "x": 1})
    store.append({"run_id": "b", "status": "failed"})
    with open(store.path, "a") as f:
        f.write('{"run_id": "c", "sta')  # killed mid-write
    reopened = ResultStore(tmp_path)
    assert list(reopened.latest()) == ["a", "b"]
    reopened.append({"run_id": "b", "status": "ok"})  # a retried run: the newer record wins
    assert reopened.latest()["b"]["status"] == "ok"
    assert all(json.loads(line) for line in store.path.read_text().splitlines())


def test_run_ids_depend_on_run_and_context():
    run = ex.Run("x", {"strategy": "topk", "k": 8}, "lambada", 10)
    assert run.run_id({"model_id": "a"}) == ex.Run("x", {"k": 8, "strategy": "topk"}, "lambada", 10).run_id({"model_id": "a"})
    assert run.run_id({"model_id": "a"}) != run.run_id({"model_id": "b"})
    assert run.run_id({"model_id": "a"}) != ex.Run("x", {"strategy": "topk", "k": 4}, "lambada", 10).run_id({"model_id": "a"})


def _logits(layers=2, tokens=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, 64, generator=g) * (1 + layer) for layer in range(layers)]


@pytest.mark.parametrize("config", [
    {"strategy": "bh", "pvalues": "zscore", "max_k": 8},
    {"strategy": "top_p", "max_k": 8},
    {"strategy": "threshold", "max_k": 8},
    {"strategy": "ratio", "max_k": 8},
])
def test_calibrate_to_mean_k_hits_the_target(config):
    logits = _logits()
    for target in (2, 4, 6):
        found = matching.calibrate_to_mean_k(config, target, logits)
        achieved = np.mean([route(l, found, layer=i).counts.float().mean().item() for i, l in enumerate(logits)])
        assert abs(achieved - target) < 0.1, (found, achieved)
        assert found["calibrated"]["achieved_k"] == pytest.approx(achieved, abs=1e-3)


def test_calibrate_to_mean_k_per_layer():
    logits = _logits()  # the two layers have differently peaked routers, so the knobs differ
    found = matching.calibrate_to_mean_k({"strategy": "top_p", "max_k": 8}, 3, logits, per_layer=True)
    knobs = []
    for layer, config in found["per_layer"].items():
        assert abs(route(logits[layer], config).counts.float().mean().item() - 3) < 0.1
        knobs.append(config["p"])
    assert knobs[0] != knobs[1]


def test_presets_cover_the_seed_grids():
    budget = ex.BUDGETS["colab"]
    deep = ex.bh_deep_dive(budget)
    assert len([r for r in deep if r.group.startswith("alpha/")]) == 8 * 4
    softmax = [r.routing for r in deep if r.group == "temperature/softmax"]
    assert {c["pvalues"] for c in softmax} == {"softmax"} and len({c["temperature"] for c in softmax}) == 5
    weights = [r.routing for r in deep if r.group == "weights temperature"]
    assert len({c["weights_temperature"] for c in weights}) == 5 and not any("temperature" in c for c in weights)
    assert len([r for r in deep if r.group == "alpha x max_k"]) == 12
    full = ex.full_experiments(budget)
    assert {r.task for r in full} == {"wikitext", "hellaswag", "lambada"}
    assert {r.routing["max_k"] for r in full if r.routing["strategy"] == "bh"} >= {4, 8, 16, 32, 64}
    assert [r.label for r in ex.prompt_suite(budget)] == list(ex.SEED_PROMPT_CONFIGS)


def _sweep_command(out, *extra):
    return [sys.executable, "-m", "bh_routing", "sweep", "--preset", "prompts", "--budget", "smoke",
            "--calibration-tokens", "2048", "--out", str(out), *extra]


@needs_tiny
def test_killed_sweep_resumes_with_every_run_exactly_once(tmp_path):
    out = tmp_path / "sweep"
    results = out / "results.jsonl"
    process = subprocess.Popen(_sweep_command(out), cwd=tmp_path, env=OFFLINE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the sweep finished before it could be killed: give it more runs"
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = [json.loads(line)["run_id"] for line in results.read_text().splitlines() if line.strip()]
    assert 2 <= len(finished_before) < len(ex.SEED_PROMPT_CONFIGS)
    subprocess.run(_sweep_command(out), cwd=tmp_path, env=OFFLINE, check=True, capture_output=True, timeout=600)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    ids = [r["run_id"] for r in records]
    assert len(ids) == len(set(ids)) == len(ex.SEED_PROMPT_CONFIGS)  # each run exactly once
    assert ids[:len(finished_before)] == finished_before  # finished work kept, not redone
    assert all(r["status"] == "ok" for r in records)
    assert (out / "REPORT.md").exists()


@needs_tiny
def test_max_new_tokens_sets_the_prompt_suite_generation_length(tmp_path):
    out = tmp_path / "sweep"
    done = subprocess.run(_sweep_command(out, "--max-new-tokens", "3"), cwd=tmp_path, env=OFFLINE,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == len(ex.SEED_PROMPT_CONFIGS) and all(r["status"] == "ok" for r in records)
    prompts = len(records[0]["prompts"])
    # greedy generation of exactly 3 tokens per prompt (the smoke budget's default is 4)
    assert {r["generated_tokens"] for r in records} == {3 * prompts}
    # then the routings timed interleaved: latency.json, the only timing the report draws
    latency = json.loads((out / "latency.json").read_text())
    assert len(latency["rounds"]) == latency["repeats"] == 3 and latency["new_tokens"] == 3
    assert [c["label"] for c in latency["configs"]] == list(ex.SEED_PROMPT_CONFIGS)
    assert all(sorted(r["order"]) == sorted(ex.SEED_PROMPT_CONFIGS) for r in latency["rounds"])
    assert len({r["order"][0] for r in latency["rounds"]}) == 3                 # rotated: interleaved
    report = (out / "REPORT.md").read_text()
    for name in ("experts_vs_latency", "load_cv", "reduction"):
        assert (out / f"{name}.png").exists() and f"]({name}.png)" in report, name


@needs_tiny
@pytest.mark.slow   # the whole demo: `python -m pytest -q -m slow`
def test_demo_command_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "bh_routing", "demo", "--budget", "smoke", "--calibration-tokens",
                           "4096", "--out", str(out)], cwd=tmp_path, env=OFFLINE, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert records and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    report = (out / "REPORT.md").read_text()
    assert "2.6 M-parameter pipeline model" in report and "## Paired comparisons" in report
    assert "at chance on this model: no conclusion" in report        # 8 HellaSwag questions on the tiny model
    for name in ("runs.csv", "comparison.csv", "domains.csv", "analysis_summary.json", "pareto_domains.png",
                 "experts_by_domain.png", "bh_routing.log"):
        assert (out / name).exists(), name
    assert not (out / "speed_by_config.png").exists()                # no timing pass: no throughput chart
    summary = json.loads((out / "analysis_summary.json").read_text())
    native = [r for r in records if r["label"] == "native top-8" and r["task"] == "domains"][0]
    assert native["experts"]["mean_experts"] == 8.0
    # the demo's domains comparisons are all tested: 128 held-out documents, top-2 is clearly worse
    top2 = [c for c in summary["comparisons"] if c["task"] == "domains" and c["candidate"] == "top-2"][0]
    assert top2["n"] == 128 and top2["verdict"] == "worse"


def test_calibration_size_follows_the_smallest_critical_value_of_the_sweep():
    from bh_routing.pvalues import calibration_requirement
    configs = [{"strategy": "bh", "alpha": 0.05}, {"per_layer": {0: {"strategy": "by", "alpha": 0.02}}},
               {"strategy": "bh", "pvalues": "zscore", "alpha": 1e-6}, {"strategy": "topk", "k": 8}]
    need = calibration_requirement(0.02, "by", 64, 8, "empirical")
    assert ex.calibration_size(configs, 64, 8) == (need.tokens, need.null_samples)
    assert ex.calibration_size([{"strategy": "top_p", "p": 0.3}], 64, 8) == (0, 0)


def _ids(runs) -> str:
    return hashlib.sha256("\n".join(r.run_id({"model": "m"}) for r in runs).encode()).hexdigest()[:16]


def test_preset_grids_default_to_the_presets_whose_run_ids_finished_sweeps_hold():
    # Digests of the run ids the presets built before their grids became arguments: a default that
    # drifts would re-run every finished run of a resumed sweep.
    budget = ex.BUDGETS["colab"]
    assert _ids(ex.full_experiments(budget)) == "d650d0b57dc37cfc"
    assert _ids(ex.full_experiments(budget, ("domains", "wikitext", "hellaswag", "lambada"))) == "ff4ccd1efcfee1c9"
    assert _ids(ex.bh_deep_dive(budget)) == "0e405143073f217c"


def test_editing_a_grid_changes_exactly_the_runs_it_builds():
    budget = ex.BUDGETS["smoke"]
    deep = ex.bh_deep_dive(budget, alphas=(0.03, 0.07), pvalues=("empirical",))
    assert sorted(r.routing["alpha"] for r in deep if r.group.startswith("alpha/")) == [0.03, 0.07]
    assert {r.group for r in deep if r.group.startswith("alpha/")} == {"alpha/empirical"}
    default = ex.bh_deep_dive(budget)
    assert [r for r in deep if not r.group.startswith("alpha/")] == [r for r in default if not r.group.startswith("alpha/")]
    deep = ex.bh_deep_dive(budget, temperatures=(0.3,), weights_temperatures=(), max_ks=(8,), topk_ks=(16,))
    assert [r.routing["temperature"] for r in deep if r.group == "temperature/softmax"] == [0.3]
    assert not [r for r in deep if r.group == "weights temperature"]
    assert {r.routing["max_k"] for r in deep if r.group == "alpha x max_k"} == {8}
    assert [r.routing for r in deep if r.group == "top-k by k"] == [{"strategy": "topk", "k": 16}]
    full = ex.full_experiments(budget, ("wikitext",), ks=(3,), alphas=(0.2,), strategies=("top-k", "bh alpha"))
    assert [(r.label, r.routing) for r in full] == [
        ("top-3", {"strategy": "topk", "k": 3}), ("BH α=0.2 max_k=8", {"strategy": "bh", "alpha": 0.2, "max_k": 8})]


@pytest.mark.parametrize("kwargs, message", [
    ({"alphas": 0.05}, "alphas must be a list or tuple"),
    ({"pvalues": ("bonferroni",)}, "pvalues: unknown ['bonferroni']"),
])
def test_bad_grids_are_refused_before_any_run_is_built(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ex.bh_deep_dive(ex.BUDGETS["smoke"], **kwargs)
    with pytest.raises(ValueError, match="strategies: unknown"):
        ex.full_experiments(ex.BUDGETS["smoke"], strategies=("topk",))
