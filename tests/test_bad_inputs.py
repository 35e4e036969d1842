"""Every bad input gets a clear error before work starts, naming the problem (API and CLI, one table)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from bh_routing import Calibration, build_router
from bh_routing import experiments as ex, matching
from bh_routing.__main__ import main
from bh_routing.models import TINY_MODEL_DIR, resolve_device
from bh_routing.store import ResultStore, check_run_id

pytestmark = pytest.mark.skipif(not (Path(TINY_MODEL_DIR) / "model.safetensors").exists(),
                                reason="the bundled tiny OLMoE is not in this checkout")
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny():
    from bh_routing.models import load_model
    model, tokenizer = load_model("tiny", verbose=False)
    calibration, _ = ex.calibrate(model, tokenizer, max_tokens=1024, model_id="tiny")
    return model, tokenizer, calibration


def _other_shape_calibration() -> Calibration:  # a 16-layer calibration, labelled as the real OLMoE
    g = torch.Generator().manual_seed(0)
    return Calibration.from_router_logits([torch.randn(300, 64, generator=g) for _ in range(16)], top_k=8,
                                          metadata={"model": "allenai/OLMoE-1B-7B-0924"})


def _files(tmp: Path, tiny) -> dict[str, Path]:
    (tmp / "a_file").write_text("not a folder")
    (tmp / "a_folder").mkdir()
    (tmp / "garbage.safetensors").write_bytes(b"\x00\x01 not safetensors at all")
    _other_shape_calibration().save(tmp / "other_model.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp / "foreign.safetensors"), metadata={"format": "something else"})
    return {name.split(".")[0]: tmp / name for name in ("a_file", "a_folder", "garbage.safetensors", "other_model.safetensors",
                                          "foreign.safetensors")}


def _run(**overrides):
    return ex.Run(**{"label": "x", "routing": {"strategy": "topk", "k": 8}, "task": "wikitext", "n": 1,
                     "max_length": 64, **overrides})


def _sweep(t, runs, out="sweep"):
    model, tokenizer, calibration = t["tiny"]
    return ex.run_sweep(ex.SweepContext(model, tokenizer, "tiny", calibration), runs, t["tmp"] / out, progress=False)


def _evaluate(t, **kwargs):
    from bh_routing.evaluation import evaluate
    model, tokenizer, _ = t["tiny"]
    return evaluate(model, tokenizer, "lambada", **{"max_length": 64, **kwargs})


def _patch_without_recorder(t):
    from bh_routing.patching import RoutingPatch
    model, _, _ = t["tiny"]
    with RoutingPatch(model, {"strategy": "topk", "k": 8}, record=False, verbose=False) as patch:
        model(torch.tensor([[5, 6, 7]]))
    return patch.recorder.counts()


def _tamper_weights_then_load(t):
    model, _, calibration = t["tiny"]
    calibration.save(t["tmp"] / "tiny.safetensors")
    parameter = next(model.parameters())
    saved = parameter.detach().clone()
    try:
        with torch.no_grad():
            parameter.mul_(-1.5)  # same shape, other weights
        Calibration.load(t["tmp"] / "tiny.safetensors", model=model)
    finally:
        with torch.no_grad():
            parameter.copy_(saved)


CALIBRATE = {"strategy": "top_p", "max_k": 8}
CONFIG = {"strategy": "bh", "pvalues": "zscore"}

# (case, action, words the message must contain)
API = [
    ("config None", lambda t: build_router(None), ["routing config must be a dict", "None"]),
    ("config string", lambda t: build_router("bh"), ["routing config must be a dict", "'bh'"]),
    ("alpha True", lambda t: build_router({**CONFIG, "alpha": True}), ["alpha must be a number", "True"]),
    ("alpha string", lambda t: build_router({**CONFIG, "alpha": "0.05"}), ["alpha must be a number", "'0.05'"]),
    ("alpha 0", lambda t: build_router({**CONFIG, "alpha": 0}), ["alpha must be in (0, 1]"]),
    ("alpha 1.5 (numpy)", lambda t: build_router({**CONFIG, "alpha": np.float32(1.5)}), ["alpha must be in (0, 1]"]),
    ("alpha NaN", lambda t: build_router({**CONFIG, "alpha": float("nan")}), ["alpha must be in (0, 1]"]),
    ("renormalize 'no'", lambda t: build_router({**CONFIG, "renormalize": "no"}), ["renormalize must be True, False or None"]),
    ("max_k 8.5", lambda t: build_router({**CONFIG, "max_k": 8.5}), ["max_k must be a whole number", "8.5"]),
    ("max_k '8'", lambda t: build_router({**CONFIG, "max_k": "8"}), ["max_k must be a number"]),
    ("max_k 0", lambda t: build_router({**CONFIG, "max_k": 0}), ["max_k must be >= 1"]),
    ("min_k -1", lambda t: build_router({**CONFIG, "min_k": -1}), ["min_k must be >= 0"]),
    ("k 2.5", lambda t: build_router({"strategy": "topk", "k": 2.5}), ["k must be a whole number"]),
    ("top_p without p", lambda t: build_router({"strategy": "top_p"}), ["needs 'p'"]),
    ("top_p p string", lambda t: build_router({"strategy": "top_p", "p": "0.3"}), ["top_p p must be a number"]),
    ("temperature 0", lambda t: build_router({**CONFIG, "pvalues": "softmax", "temperature": 0}), ["temperature must be"]),
    ("unknown strategy", lambda t: build_router({"strategy": "bhh"}), ["unknown strategy 'bhh'"]),
    ("unknown key", lambda t: build_router({**CONFIG, "alpah": 0.1}), ["does not take", "alpah"]),
    ("Run n -1", lambda t: _run(n=-1), ["n must be a whole number >= 1", "-1"]),
    ("Run n 0", lambda t: _run(n=0), ["n must be a whole number >= 1"]),
    ("Run n True", lambda t: _run(n=True), ["n must be a whole number", "True"]),
    ("Run max_length 0", lambda t: _run(max_length=0), ["max_length must be a whole number >= 1", "0"]),
    ("Run max_length 2.5", lambda t: _run(max_length=2.5), ["max_length must be a whole number"]),
    ("Run seed -3", lambda t: _run(seed=-3), ["seed must be a whole number >= 0"]),
    ("Run task", lambda t: _run(task="wiki"), ["unknown task 'wiki'"]),
    ("Run routing string", lambda t: _run(routing="bh"), ["routing must be a dict", "'bh'"]),
    ("Run per_layer string", lambda t: _run(routing={"per_layer": "bh"}), ["per_layer"]),
    ("Run label empty", lambda t: _run(label=""), ["label must be a non-empty string"]),
    ("Run prompts 0 tokens", lambda t: _run(task="prompts", new_tokens=0), ["new_tokens must be a whole number >= 1"]),
    ("sweep: one malformed run", lambda t: _sweep(t, [_run(), _run(label="bad", routing={"strategy": "bh", "max_k": 99})]),
     ["1 of 2 runs are invalid", "'bad'", "max_k", "nothing was run"]),
    ("sweep: run layer out of range", lambda t: _sweep(t, [_run(routing={"per_layer": {"9": {"strategy": "topk"}}})]),
     ["runs are invalid", "9"]),
    ("sweep: not a Run", lambda t: _sweep(t, [{"label": "x"}]), ["not a Run"]),
    ("sweep: two budgets in one folder", lambda t: _sweep(t, [_run(), _run(label="y", n=2)]), ["different budgets", "wikitext"]),
    ("sweep: --out is a file", lambda t: _sweep(t, [_run()], out="a_file"), ["is a file, not a folder"]),
    ("calibrate_to_mean_k target > max_k", lambda t: matching.calibrate_to_mean_k(CALIBRATE, 20, [torch.randn(50, 64)]),
     ["target_k=20 is unreachable", "[1, 8]"]),
    ("calibrate_to_mean_k topk", lambda t: matching.calibrate_to_mean_k({"strategy": "topk"}, 4, [torch.randn(50, 64)]),
     ["supports", "'topk'"]),
    ("calibrate_to_mean_k config string", lambda t: matching.calibrate_to_mean_k("bh", 4, [torch.randn(50, 64)]),
     ["config must be a routing config dict"]),
    ("calibrate tokens -5", lambda t: ex.calibrate(t["tiny"][0], t["tiny"][1], max_tokens=-5), ["max_tokens must be a whole number"]),
    ("calibration file garbage", lambda t: Calibration.load(t["files"]["garbage"]),
     ["garbage.safetensors", "recalibrate"]),
    ("calibration file missing", lambda t: Calibration.load(t["tmp"] / "nope.safetensors"), ["nope.safetensors", "recalibrate"]),
    ("calibration file foreign", lambda t: Calibration.load(t["files"]["foreign"]),
     ["not a bh_routing calibration file", "recalibrate"]),
    ("calibration of another model (shape)", lambda t: Calibration.load(t["files"]["other_model"], model=t["tiny"][0]),
     ["OLMoE-1B-7B-0924", "16 MoE layers", "5 x 64", "recalibrate on this model"]),
    ("calibration of another model (weights)", _tamper_weights_then_load, ["weights differ", "recalibrate on this model"]),
    ("SweepContext with another model's calibration",
     lambda t: ex.SweepContext(t["tiny"][0], t["tiny"][1], "tiny", _other_shape_calibration()), ["recalibrate on this model"]),
    ("evaluate n 0", lambda t: _evaluate(t, n=0), ["n must be a whole number >= 1"]),
    ("evaluate docs []", lambda t: _evaluate(t, docs=[]), ["docs is empty"]),
    ("evaluate max_length 0", lambda t: _evaluate(t, n=2, max_length=0), ["max_length must be a whole number >= 1"]),
    ("record=False then .recorder", _patch_without_recorder, ["record=False", "record=True"]),
    ("device gpu", lambda t: resolve_device("gpu"), ["device must be", "'gpu'"]),
    ("run_id path traversal", lambda t: check_run_id("../../x"), ["plain file name", "'../../x'"]),
    ("append a record without run_id", lambda t: ResultStore(t["tmp"] / "store").append({"status": "ok"}),
     ["not a valid run record", "run_id"]),
]
if NO_GPU:
    API.append(("device cuda without GPU", lambda t: resolve_device("cuda"), ["no usable CUDA GPU", "'cpu'"]))


def _cli(*argv):
    def run(t):
        try:
            code = main([str(a).format(**{k: str(v) for k, v in t["files"].items()}, tmp=t["tmp"]) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
        assert code not in (0, None)
        captured = t["capsys"].readouterr()
        assert "Traceback" not in captured.err
        return captured.err
    return run


SWEEP = ("sweep", "--preset", "prompts", "--budget", "smoke", "--calibration-tokens", "1024")
CLI = [
    ("cli calibration-tokens -5", _cli(*SWEEP[:-1], "-5"), ["--calibration-tokens", "whole number >= 1", "-5"]),
    ("cli calibration-tokens abc", _cli(*SWEEP[:-1], "abc"), ["--calibration-tokens", "'abc'"]),
    ("cli max-new-tokens 0", _cli(*SWEEP, "--max-new-tokens", "0"), ["--max-new-tokens", "whole number >= 1", "0"]),
    ("cli preset unknown", _cli("sweep", "--preset", "everything"), ["--preset", "invalid choice", "'everything'"]),
    ("cli budget unknown", _cli("sweep", "--preset", "full", "--budget", "huge"), ["--budget", "invalid choice"]),
    ("cli demo budget colab", _cli("demo", "--budget", "colab"), ["--budget", "invalid choice"]),
    ("cli out is a file", _cli(*SWEEP, "--out", "{a_file}"), ["a_file is a file, not a folder"]),
    ("cli dtype fp8", _cli(*SWEEP, "--dtype", "fp8", "--out", "{tmp}/o1"), ["dtype must be", "'fp8'"]),
    ("cli model missing", _cli(*SWEEP, "--model", "{tmp}/no/such/model", "--out", "{tmp}/o2"),
     ["no/such/model", "neither 'tiny', an existing directory"]),
    ("cli calibration missing", _cli(*SWEEP, "--calibration", "{tmp}/none.safetensors", "--out", "{tmp}/o3"),
     ["none.safetensors", "recalibrate"]),
    ("cli calibration garbage", _cli(*SWEEP, "--calibration", "{garbage}", "--out", "{tmp}/o4"),
     ["garbage.safetensors", "recalibrate"]),
    ("cli calibration of another model", _cli(*SWEEP, "--calibration", "{other_model}", "--out", "{tmp}/o5"),
     ["other_model.safetensors", "OLMoE-1B-7B-0924", "recalibrate on this model"]),
    ("cli folder of another context", _cli(*SWEEP, "--out", "{tmp}/other_context"),
     ["another context", "budget of prompts", "--restart"]),
    ("cli calibrate out is a folder", _cli("calibrate", "--out", "{a_folder}"), ["a_folder is a folder"]),
    ("cli report of a file", _cli("report", "{a_file}"), ["a_file is not a folder"]),
    ("cli report of an empty folder", _cli("report", "{a_folder}"), ["holds no usable results.jsonl records"]),
]
if NO_GPU:
    CLI.append(("cli device cuda without GPU", _cli(*SWEEP, "--device", "cuda", "--out", "{tmp}/o6"), ["no usable CUDA GPU"]))


def test_the_table_has_at_least_40_cases():
    assert len(API) + len(CLI) >= 40 and len(CLI) >= 10


@pytest.fixture
def t(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "other_context").mkdir()
    (tmp_path / "other_context" / "context.json").write_text(json.dumps({"budget": {"prompts": {"new_tokens": 99}}}))
    handlers = list(logging.getLogger().handlers)
    yield {"tiny": tiny, "tmp": tmp_path, "capsys": capsys, "files": _files(tmp_path, tiny)}
    for handler in set(logging.getLogger().handlers) - set(handlers):  # main() logs into each --out
        logging.getLogger().removeHandler(handler)
        handler.close()


@pytest.mark.parametrize("case, action, words", API + CLI, ids=[case for case, _, _ in API + CLI])
def test_bad_input_is_refused_with_a_message_naming_it(t, case, action, words):
    if case.startswith("cli"):
        message = action(t)
    else:
        with pytest.raises((ValueError, TypeError, AttributeError, OSError)) as info:
            action(t)
        message = str(info.value)
    missing = [word for word in words if word not in message]
    assert not missing, f"{case}: {missing} not in {message!r}"
    assert not (t["tmp"] / "sweep" / "results.jsonl").exists()  # refused before any work


def test_alpha_accepts_numpy_and_torch_scalars():
    logits = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    reference = build_router({**CONFIG, "alpha": 0.2})(logits).counts
    for alpha in (np.float32(0.2), np.float64(0.2), torch.tensor(0.2, dtype=torch.float64)):
        assert torch.equal(build_router({**CONFIG, "alpha": alpha})(logits).counts, reference)
    whole = build_router({**CONFIG, "max_k": 8.0, "min_k": np.int64(1)})  # what JSON or numpy give
    assert (whole.max_k, whole.min_k) == (8, 1) and isinstance(whole.max_k, int)


def test_unreachable_mean_k_warns_with_what_was_reached():
    one_token = [torch.randn(1, 64, generator=torch.Generator().manual_seed(1))]  # its k is a whole number
    with pytest.warns(UserWarning, match=r"reaches mean k [23]\.000, not the target 2\.5"):
        matching.calibrate_to_mean_k({"strategy": "top_p", "max_k": 8}, 2.5, one_token)
