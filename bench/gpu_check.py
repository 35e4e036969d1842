"""The GPU check: one command, one JSON, about 5 minutes on one H100/H200 (``bench/gpu_check.sh``).

    python bench/gpu_check.py                         # CUDA: OLMoE-1B-7B shapes, random weights
    python bench/gpu_check.py --device cpu --tiny     # smoke test of every section (small shapes)

Sections (each result is written to the JSON as soon as it exists; a failing section is recorded
and the script exits non-zero at the end):
1. ``selection``: every routing strategy against native softmax + top-8 on the same logits,
   T = 32,768 (target: BH <= 1.5x native).
2. ``model_<dtype>`` for float16 and bfloat16: the full-size model (16 layers, hidden 2048, 64
   experts x 1024, vocab 50,304), random weights, a forward of ``--batch`` x ``--length`` tokens:
   unpatched, patched top-8 (native and compact dispatch), k~4 (``top_p`` tuned per layer),
   ``bh zscore``: tokens/s and peak memory. NaN/inf logits fail the check (float16 overflow).
3. ``t4_plan``: the process capped to a T4's free memory (``T4_FREE_BYTES``, via
   ``torch.cuda.set_per_process_memory_fraction``), float16: the notebooks' recording batch
   (``Session.batch_size(512)`` from the T4 memory plan) unpatched and BH-patched, then the
   evaluator with the token budget the same plan gives; any out-of-memory (or OOM retry) fails.
4. ``evaluator``: the evaluator's input tokens/s (HellaSwag, bundled data) unpatched and BH-patched.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_selection  # noqa: E402
from bench_moe_layer import OLMOE_1B_7B, build_model, machine_info, timed, tune_top_p  # noqa: E402
from bh_routing import evaluation as ev  # noqa: E402
from bh_routing.models import TINY_MODEL_DIR, memory_plan  # noqa: E402
from bh_routing.cost import T4_FREE_BYTES  # noqa: E402
from bh_routing.patching import RoutingPatch, find_moe_blocks  # noqa: E402

FULL = dict(hidden=OLMOE_1B_7B["hidden_size"], intermediate=OLMOE_1B_7B["intermediate_size"],
            experts=OLMOE_1B_7B["num_experts"], top_k=OLMOE_1B_7B["num_experts_per_tok"],
            layers=OLMOE_1B_7B["num_hidden_layers"], vocab=OLMOE_1B_7B["vocab_size"])
TINY = dict(hidden=64, intermediate=32, experts=64, top_k=8, layers=2, vocab=4096)
BH = {"strategy": "bh", "alpha": 0.05, "pvalues": "zscore"}


class CheckFailed(RuntimeError):
    """A GPU-check criterion failed (NaN/inf, out of memory): the check exits non-zero."""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckFailed(f"{what}: {bad} NaN/inf values in {tensor.dtype} ({tuple(tensor.shape)})")


def section_selection(device, tokens: int, repeats: int) -> dict:
    rows = bench_selection.run(device, [tokens], repeats, torch.float32)
    ratios = {row["strategy"]: row["ratio"] for row in rows}
    bh = {name: ratio for name, ratio in ratios.items() if name.startswith("bh")}
    return {"tokens": tokens, "rows": rows, "target_bh_max_ratio": 1.5, "bh_ratios": bh,
            "target_met": max(bh.values()) <= 1.5}


def _routings(model, input_ids, top_k: int) -> dict:
    """{label: (config or per-layer configs, dispatch)}: k~4 = top_p tuned on each layer's own logits."""
    blocks, inputs = find_moe_blocks(model), []
    handles = [b.module.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in blocks]
    with torch.no_grad():
        model(input_ids[:1], use_cache=False)
    for handle in handles:
        handle.remove()
    k4 = {b.layer: tune_top_p(torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), b.module.gate.weight).float(),
                              4.0, top_k) for b, x in zip(blocks, inputs)}
    return {f"top-{top_k} native": ({"strategy": "topk", "k": top_k}, "native"),
            f"top-{top_k} compact": ({"strategy": "topk", "k": top_k}, "compact"),
            "k~4 compact": (k4, "compact"), "bh zscore compact": (BH, "compact")}


def _patch(model, cfg: dict, dispatch: str, record: bool) -> RoutingPatch:
    per_layer = "strategy" not in cfg  # {layer: config}
    return RoutingPatch(model, None if per_layer else cfg, layers=cfg if per_layer else None, dispatch=dispatch,
                        record=record, verbose=False)


def section_model(model, device, batch: int, length: int, repeats: int) -> dict:
    dtype = next(model.parameters()).dtype
    top_k = find_moe_blocks(model)[0].top_k
    input_ids = torch.randint(3, model.config.vocab_size, (batch, length),
                              generator=torch.Generator().manual_seed(0)).to(device)
    routings = _routings(model, input_ids, top_k)
    patches = {label: _patch(model, cfg, dispatch, record=False) for label, (cfg, dispatch) in routings.items()}
    runs, peaks, mean_k = {"unpatched": None, **patches}, {}, {}
    for label, patch in runs.items():  # one checked call each: finiteness and peak memory
        _peak_reset(device)
        with torch.no_grad(), (patch if patch is not None else contextlib.nullcontext()):
            logits = model(input_ids, use_cache=False).logits
        _sync(device)
        peaks[label] = _peak_gib(device)
        check_finite(logits, f"{label} logits ({dtype})")
        del logits
    for label, (cfg, dispatch) in routings.items():  # the k each routing really used
        with torch.no_grad(), _patch(model, cfg, dispatch, record=True) as recording:
            model(input_ids[:1], use_cache=False)
        mean_k[label] = float(recording.recorder.counts().mean())

    def forward(patch):
        def run():
            if patch is None:
                model(input_ids, use_cache=False)
            else:
                with patch:
                    model(input_ids, use_cache=False)
        return run
    seconds = timed({label: forward(p) for label, p in runs.items()}, repeats, 1, device)
    tokens = batch * length
    return {"dtype": str(dtype), "batch": batch, "length": length, "mean_k": mean_k,
            "tokens_per_s": {label: tokens / s for label, s in seconds.items()},
            "relative_to_unpatched": {label: seconds["unpatched"] / s for label, s in seconds.items()},
            "peak_memory_gib": peaks, "finite": True}


def _tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR))


def section_evaluator(model, device, n: int, max_batch_tokens: int | None = None) -> dict:
    tokenizer = _tokenizer()

    def hellaswag(items: int, seed: int):
        return ev.evaluate(model, tokenizer, "hellaswag", n=items, seed=seed, source="bundled", max_length=512,
                           max_batch_tokens=max_batch_tokens)
    hellaswag(4, seed=1)  # warm-up
    out = {}
    for label, config in (("unpatched", None), ("bh zscore", BH)):
        with RoutingPatch(model, config, verbose=False) if config else contextlib.nullcontext():
            result = hellaswag(n, seed=0)
        scoring = result.config["scoring"]
        check_finite(torch.as_tensor(result.token_logprobs), f"evaluator {label} log-probabilities")
        out[label] = {key: scoring[key] for key in ("input_tokens_per_s", "seconds", "input_tokens", "n_batches",
                                                      "max_batch_tokens", "oom_retries")}
        if scoring["oom_retries"]:
            raise CheckFailed(f"evaluator {label}: {scoring['oom_retries']} out-of-memory retries")
    return out


def section_t4(model, device, n: int) -> dict:
    """Run the notebooks' batch plan for a T4 under a T4-sized memory cap (float16 model)."""
    from bh_routing.cost import t4_memory_plan
    plan = t4_memory_plan()  # what the notebooks plan on a T4 (full logits)
    batch = max(1, min(64, plan.max_batch(512)))  # Session.batch_size(512) on CUDA
    evaluator_plan = memory_plan(model.config, T4_FREE_BYTES, torch.float16, logits="last")
    evaluator_tokens = int((evaluator_plan.token_budget_bytes - ev.engine._LOGIT_CHUNK_BYTES) // evaluator_plan.bytes_per_token)
    ids = torch.randint(3, min(model.config.vocab_size, 4096), (batch, 512)).to(device)
    peaks = {}
    try:
        for label, config in (("unpatched", None), ("bh zscore", BH)):
            _peak_reset(device)
            with torch.no_grad():
                if config is None:
                    logits = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
                else:
                    with RoutingPatch(model, config, verbose=False):
                        logits = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            check_finite(logits, f"T4 plan {label} logits")
            del logits
            peaks[label] = _peak_gib(device)
        evaluator = section_evaluator(model, device, n, max_batch_tokens=evaluator_tokens)
    except torch.OutOfMemoryError as error:
        raise CheckFailed(f"out of memory under the T4 cap ({T4_FREE_BYTES / 2 ** 30:.1f} GiB): {error}") from error
    return {"cap_gib": T4_FREE_BYTES / 2 ** 30, "recording_batch": [batch, 512], "peak_memory_gib": peaks,
            "evaluator_max_batch_tokens": evaluator_tokens, "evaluator": evaluator}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes: a smoke test of every section")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--batch", type=int, default=None, help="sequences per model forward (default 8; tiny 2)")
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence (default 512; tiny 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; tiny 1)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --device cpu --tiny for the smoke test")
    shape = TINY if args.tiny else FULL
    batch, length = args.batch or (2 if args.tiny else 8), args.length or (64 if args.tiny else 512)
    repeats = args.repeats or (1 if args.tiny else 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check_{device.type}{'_tiny' if args.tiny else ''}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    results = {"machine": machine_info(device), "args": vars(args), "shape": shape, "sections": {}, "failures": {}}

    def save():
        path.write_text(json.dumps(results, indent=1, default=str))

    def section(name, fn):
        started = time.perf_counter()
        try:
            results["sections"][name] = fn()
        except Exception as error:  # recorded; the check fails at the end, the other sections still run
            results["failures"][name] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        results["sections"].setdefault(name, {})["wall_seconds"] = time.perf_counter() - started
        print(f"[gpu_check] {name}: {'FAILED ' + results['failures'][name] if name in results['failures'] else 'ok'}"
              f" ({time.perf_counter() - started:.0f} s)", flush=True)
        save()

    section("selection", lambda: section_selection(device, 2048 if args.tiny else 32768, 5 if args.tiny else 30))
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        if device.type == "cuda" and dtype == torch.float16:  # the T4 cap first, on a clean allocator
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(T4_FREE_BYTES / torch.cuda.get_device_properties(device).total_memory)
        model = build_model(shape["hidden"], shape["intermediate"], shape["experts"], shape["top_k"],
                            shape["layers"], shape["vocab"], dtype, device)
        if dtype == torch.float16:
            section("t4_plan", lambda model=model: section_t4(model, device, 8 if args.tiny else 100))
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0)
        section(f"model_{dtype_name}", lambda model=model: section_model(model, device, batch, length, repeats))
        if dtype_name == args.dtypes.split(",")[-1]:
            section("evaluator", lambda model=model: section_evaluator(model, device, 8 if args.tiny else 200))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["machine"]["load_average_end"] = os.getloadavg()
    save()
    print(f"wrote {path}")
    if results["failures"]:
        print("GPU CHECK FAILED: " + "; ".join(f"{k}: {v}" for k, v in results["failures"].items()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
