"""Every benchmark script runs as its docstring says, at a small size, and what it checks holds: the
evaluator scores as the naive loop and as lm-eval, the prompt suite generates what the seed design
does, each routing selects the k it was set to. The speed figures themselves are not asserted (a
timed unit test on a shared machine proves nothing); the committed JSON in bench/results/ has them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bench_process(script: str, tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """bench/<script> run as its docstring says (from the repository root), with --out tmp_path."""
    return subprocess.run([sys.executable, f"bench/{script}", *args, "--out", str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=timeout)


def run_bench(script: str, tmp_path: Path, *args: str) -> dict:
    """Runs bench/<script> with --out tmp_path; returns its one JSON."""
    done = bench_process(script, tmp_path, *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text())


def test_bench_eval(tmp_path):
    result = run_bench("bench_eval.py", tmp_path, "--hellaswag", "4", "--lambada", "4", "--wikitext", "1",
                       "--threads", "1")
    assert [row["task"] for row in result["tasks"]] == ["hellaswag", "lambada", "wikitext"]
    assert result["machine"]["torch_threads"] == 1
    for row in result["tasks"]:
        assert row["max_abs_delta_logprob"] <= 1e-4 and row["greedy_equal"], row["task"]
        assert 0 < row["fraction_of_bound_median"] and 0 < row["fraction_of_own_shapes_floor_median"]
        assert sum(rows * width for rows, width in row["batch_shapes"]) >= row["computed_tokens"]
    hellaswag = result["tasks"][0]
    assert hellaswag["computed_tokens"] < hellaswag["input_tokens"]          # each context computed once
    assert hellaswag["other_share_prefix"]["computed_tokens"] == hellaswag["input_tokens"]
    assert hellaswag["other_share_prefix"]["max_abs_delta_logprob"] <= 1e-4


def test_bench_vs_lm_eval(tmp_path):
    result = run_bench("bench_vs_lm_eval.py", tmp_path, "--threads", "1", "--repeats", "1",
                       "--hellaswag", "4", "--lambada", "4", "--wikitext", "1")
    (run,) = result["runs"]
    assert [row["task"] for row in run["tasks"]] == ["hellaswag", "lambada", "wikitext"]
    for row in run["tasks"]:
        assert max(row["max_relative_metric_delta"].values()) <= 1e-4, row["task"]   # same scores as HFLM
        assert all(seconds > 0 for seconds in row["best_seconds"].values())


def test_bench_selection(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_selection import STRATEGIES
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = run_bench("bench_selection.py", tmp_path, "--tokens", "512", "--repeats", "2", "--device", "cpu")
    assert {row["strategy"] for row in rows} == set(STRATEGIES)
    assert all(row["tokens"] == 512 and row["ratio"] > 0 for row in rows)


def test_bench_sweep(tmp_path):
    result = run_bench("bench_sweep.py", tmp_path, "--new-tokens", "4")
    assert result["rows"] and all(row["same_outputs"] == "12/12" for row in result["rows"])


def test_bench_moe_layer_blocks_and_model(tmp_path):
    result = run_bench("bench_moe_layer.py", tmp_path, "--configs", "tiny", "--tokens", "64", "--layers", "2",
                       "--repeats", "2", "--warmup", "1")
    block = result["blocks"]["tiny"]
    assert block["mean_k"]["k=8"] == 8.0 and block["mean_k"]["k=4"] == 4.0
    assert abs(block["mean_k"]["k~4"] - 4) <= 0.5
    model = result["model"]
    assert set(model["tokens_per_s"]) == {"unpatched", "patched topk k=8", "patched topk k=8 +record",
                                          "patched k~4 compact", "patched topk k=4"}
    assert all(abs(k - 4) <= 0.5 for k in model["variable_mean_k_per_layer"])


def test_bench_real_shape_block(tmp_path):
    result = run_bench("bench_real_shape.py", tmp_path, "--tokens", "64", "--dtypes", "float32", "--threads", "1",
                       "--repeats", "1", "--warmup", "1")
    (run,) = result["runs"]
    assert run["threads"] == 1 and run["tokens"] == 64
    assert run["mean_k"]["native top-8"] == run["mean_k"]["compact top-8"] == 8.0
    assert abs(run["mean_k"]["compact k~4"] - 4) <= 0.5
    assert all(0 <= share < 1 for share in run["selection_shares"].values())


def test_bench_real_shape_model(tmp_path):
    result = run_bench("bench_real_shape.py", tmp_path, "--model-layers", "1", "--items", "2", "--dtypes", "bfloat16",
                       "--threads", "1", "--repeats", "1", "--warmup", "1")
    (run,) = result["model_eval"]
    delta = run["max_abs_logprob_delta_vs_unpatched"]
    assert delta["top-8 native"] == 0.0 and delta["top-8 compact"] <= 1e-3   # the model's own routing
    assert delta["k~4 compact"] > 0.01                                      # fewer experts: other scores
    assert all(rate > 0 for rate in run["tokens_per_s"].values())


def test_bench_vs_lm_eval_refuses_an_empty_task_before_loading(tmp_path):
    done = bench_process("bench_vs_lm_eval.py", tmp_path, "--lambada", "0", timeout=120)
    assert done.returncode == 2 and "--lambada must be at least 1" in done.stderr
    assert not list(tmp_path.iterdir())
