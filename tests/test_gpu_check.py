"""The GPU check's CPU-runnable parts: its smoke mode runs every section and writes one JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_smoke_mode_runs_every_section(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_check_cpu_tiny_*.json")
    result = json.loads(path.read_text())
    assert result["failures"] == {}
    assert set(result["sections"]) == {"selection", "t4_plan", "model_float16", "model_bfloat16", "evaluator"}
    selection = result["sections"]["selection"]
    assert selection["tokens"] == 2048 and all(r > 0 for r in selection["bh_ratios"].values())
    for dtype in ("float16", "bfloat16"):
        model = result["sections"][f"model_{dtype}"]
        assert model["finite"] and model["dtype"] == f"torch.{dtype}"
        assert model["mean_k"]["top-8 native"] == model["mean_k"]["top-8 compact"] == 8.0
        assert 3.5 <= model["mean_k"]["k~4 compact"] <= 4.5
        assert all(v > 0 for v in model["tokens_per_s"].values())
    t4 = result["sections"]["t4_plan"]
    assert t4["recording_batch"] == [2, 512]  # the notebooks' T4 plan: 2 x 512 with full logits
    for run in (*t4["evaluator"].values(), *(v for k, v in result["sections"]["evaluator"].items() if k != "wall_seconds")):
        assert run["oom_retries"] == 0 and run["input_tokens_per_s"] > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_fp16_output_fails_the_check(bad):
    from gpu_check import CheckFailed, check_finite
    logits = torch.zeros(2, 3, dtype=torch.float16)
    check_finite(logits + 1, "finite")
    logits[1, 2] = bad
    with pytest.raises(CheckFailed, match="1 NaN/inf"):
        check_finite(logits, "fp16 logits")
    overflow = torch.tensor([60000.0], dtype=torch.float16) * 2  # fp16 overflow -> inf
    with pytest.raises(CheckFailed):
        check_finite(overflow, "overflow")
