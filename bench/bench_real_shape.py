"""One OLMoE-1B-7B MoE block at its real shapes (hidden 2048, 64 experts x intermediate 1024, top-8),
random weights, the installed transformers' own block: what the patch costs and what variable k saves.

    python bench/bench_real_shape.py                                   # T 512,2048,8192; fp32,bf16; 1,2 threads
    python bench/bench_real_shape.py --tokens 2048 --dtypes float32 --threads 1 --profile
    python bench/bench_real_shape.py --model-layers 4 --dtypes bfloat16 --threads 1 --items 10 --repeats 2

Per (threads, dtype, T), timed round-robin in one process (A B C A B C ...), after a warm-up:
* ``unpatched``: the model's own block (router + top-8 + its experts kernel);
* ``native top-8``: patched, routing ``topk k=8`` through the model's own experts kernel;
* ``compact top-8``: patched, same routing, our compact dispatch;
* ``compact k~4``: patched, ``top_p`` with p bisected on the block's own router logits to mean k = 4;
* the selection kernels alone on the block's router logits (``top_p`` k~4, ``bh zscore``, native
  softmax + top-8), to give their share of the patched block's time.
Median, min and max of ``--repeats`` samples; ratios are medians over the unpatched median of the
same run. ``--profile``: a torch.profiler table of the patched k~4 block (the first config).
``--model-layers N``: instead, a full-width model of N decoder layers (attention + MoE, vocab
50,304): the evaluator's tokens/s on HellaSwag under each routing (``bench_model_eval``).
Writes bench/results/real_shape_cpu_<stamp>.json or real_model_cpu_<stamp>.json (machine, threads,
versions, load average).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_moe_layer import CONFIGS, build_model, machine_info, tune_top_p  # noqa: E402
from bh_routing.patching import RoutingPatch, find_moe_blocks  # noqa: E402
from bh_routing.selection import build_router  # noqa: E402

FULL = CONFIGS["full"]
TARGETS = {"compact k~4 / unpatched at T=2048": 0.6, "native top-8 / unpatched (min)": 0.97,
           "selection share of the patched k~4 block": 0.05}


def round_robin(variants: dict, repeats: int, warmup: int) -> dict:
    """Seconds per call of each variant: {name: {median, min, max, samples}}, interleaved."""
    samples = {name: [] for name in variants}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    samples[name].append(elapsed)
    return {name: {"median": statistics.median(s), "min": min(s), "max": max(s), "samples": s}
            for name, s in samples.items()}


def repeated(fn, seconds: float = 0.05):
    """``fn`` called enough times per sample to last ~``seconds`` (small kernels), returning per-call time."""
    start = time.perf_counter()
    fn()
    calls = max(1, int(seconds / max(time.perf_counter() - start, 1e-6)))

    def run():
        for _ in range(calls):
            fn()
    return run, calls


def bench_config(model, tokens: int, dtype, repeats: int, warmup: int, seed: int = 0) -> dict:
    block = find_moe_blocks(model)[0].module
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, FULL["hidden"], generator=generator).to(dtype)  # [1, T, H]
    with torch.no_grad():
        logits = torch.nn.functional.linear(x.reshape(tokens, -1), block.gate.weight).float()  # [T, E]
    routings = {"native top-8": {"strategy": "topk", "k": 8}, "compact top-8": {"strategy": "topk", "k": 8},
                "compact k~4": tune_top_p(logits, 4.0, 8)}
    patches = {name: RoutingPatch(model, config, dispatch=name.split()[0], record=False, verbose=False)
               for name, config in routings.items()}

    def patched(patch):
        def run():
            with patch:
                block(x)
        return run
    variants = {"unpatched": lambda: block(x), **{name: patched(p) for name, p in patches.items()}}
    selections = {"select top_p k~4": build_router(routings["compact k~4"]),
                  "select bh zscore": build_router({"strategy": "bh", "alpha": 0.05, "pvalues": "zscore"}),
                  "select native top-8": lambda lg: torch.topk(torch.softmax(lg, -1, dtype=torch.float), 8, -1)}
    calls = {}
    for name, select in selections.items():
        variants[name], calls[name] = repeated((lambda s: lambda: s(logits))(select))
    times = round_robin(variants, repeats, warmup)
    for name, n in calls.items():
        times[name] = {key: ([v / n for v in value] if key == "samples" else value / n) for key, value in times[name].items()}
    mean_k = {name: float(build_router(c)(logits).counts.float().mean()) for name, c in routings.items()}
    mean_k["bh zscore"] = float(selections["select bh zscore"](logits).counts.float().mean())
    med = {name: t["median"] for name, t in times.items()}
    ratios = {f"{name} / unpatched": med[name] / med["unpatched"] for name in routings}
    # the fastest sample is the least disturbed by other load on a shared machine: reported beside the medians
    ratios_of_min = {f"{name} / unpatched": times[name]["min"] / times["unpatched"]["min"] for name in routings}
    shares = {f"{name} / patched compact k~4 block": med[name] / med["compact k~4"] for name in selections}
    return {"tokens": tokens, "dtype": str(dtype), "routings": routings, "mean_k": mean_k,
            "seconds": times, "ratios": ratios, "ratios_of_min": ratios_of_min,
            "selection_shares": shares}


def profile_table(model, tokens: int, dtype, rows: int = 25) -> str:
    block = find_moe_blocks(model)[0].module
    x = torch.randn(1, tokens, FULL["hidden"]).to(dtype)
    with torch.no_grad():
        logits = torch.nn.functional.linear(x.reshape(tokens, -1), block.gate.weight).float()
    patch = RoutingPatch(model, tune_top_p(logits, 4.0, 8), record=False, verbose=False)
    with torch.no_grad(), patch:
        block(x)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            block(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def bench_model_eval(layers: int, dtype, items: int, repeats: int) -> dict:
    """A full-width OLMoE of ``layers`` decoder layers (attention + MoE, vocab 50,304, random weights):
    the evaluator's input tokens/s on HellaSwag (bundled, ``items`` items, 512-token windows) under each
    routing, rounds interleaved, the fastest kept; and how far each routing's per-token log-probabilities
    are from the unpatched model's (top-8, native or compact dispatch, must score as the model does)."""
    from transformers import AutoTokenizer

    from bh_routing import evaluation as ev
    from bh_routing.models import TINY_MODEL_DIR
    from gpu_check import _patch, _routings
    model = build_model(FULL["hidden"], FULL["intermediate"], FULL["experts"], FULL["top_k"], layers, 50304, dtype,
                        torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR))  # ids < 4,096: valid for the 50,304 vocabulary
    ids = torch.randint(3, 4096, (1, 512), generator=torch.Generator().manual_seed(0))
    routings = _routings(model, ids, FULL["top_k"])
    sides = {"unpatched": None, **{label: _patch(model, cfg, dispatch, record=False)
                                   for label, (cfg, dispatch) in routings.items()}}

    def evaluate(patch):
        with patch if patch is not None else contextlib.nullcontext():
            return ev.evaluate(model, tokenizer, "hellaswag", n=items, seed=0, source="bundled", max_length=512)
    evaluate(None)  # warm-up
    rates, scores = {label: [] for label in sides}, {}
    for _ in range(repeats):
        for label, patch in sides.items():
            scores[label] = evaluate(patch)
            rates[label].append(scores[label].config["scoring"]["input_tokens_per_s"])
    best = {label: max(r) for label, r in rates.items()}
    result = {"layers": layers, "dtype": str(dtype), "items": items, "tokens_per_s": best, "all_rounds": rates,
              "relative_to_unpatched": {label: v / best["unpatched"] for label, v in best.items()},
              "max_abs_logprob_delta_vs_unpatched": {
                  label: float(np.abs(r.token_logprobs - scores["unpatched"].token_logprobs).max())
                  for label, r in scores.items()}}
    print(f"\n== full-width model, {layers} layers, {dtype}, HellaSwag {items} items: evaluator tokens/s")
    for label, value in best.items():
        print(f"   {label:20s} {value:8.1f} tok/s  {result['relative_to_unpatched'][label]:6.3f}x  max |d log-prob| vs "
              f"unpatched {result['max_abs_logprob_delta_vs_unpatched'][label]:.1e}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="512,2048,8192", help="tokens per block call (comma list)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", default="1,2", help="torch CPU threads (comma list)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print a profiler table of the patched k~4 block")
    parser.add_argument("--model-layers", type=int, default=0,
                        help="instead of blocks: the evaluator on a full-width model of this many layers")
    parser.add_argument("--items", type=int, default=10, help="HellaSwag items for --model-layers")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    results = {"machine": machine_info(device), "args": vars(args), "targets": TARGETS, "runs": []}
    if args.model_layers:
        torch.set_num_threads(int(args.threads.split(",")[0]))
        results["machine"]["torch_threads"] = torch.get_num_threads()
        results["model_eval"] = [bench_model_eval(args.model_layers, getattr(torch, d), args.items, args.repeats)
                                 for d in args.dtypes.split(",")]
        return _write(results, Path(args.out), "real_model")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = build_model(FULL["hidden"], FULL["intermediate"], FULL["experts"], FULL["top_k"], 1, 256, dtype, device)
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for tokens in (int(t) for t in args.tokens.split(",")):
                run = {"threads": threads, **bench_config(model, tokens, dtype, args.repeats, args.warmup)}
                results["runs"].append(run)
                _print_run(run)
                if args.profile and "profile" not in results:
                    results["profile"] = profile_table(model, tokens, dtype)
                    print(results["profile"])
        del model
    return _write(results, Path(args.out), "real_shape")


def _write(results: dict, out: Path, name: str) -> dict:
    results["machine"]["load_average_end"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_cpu_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {path}")
    return results


def _print_run(run: dict) -> None:
    print(f"\n== threads {run['threads']}, {run['dtype']}, T {run['tokens']}; mean k {run['mean_k']}")
    for name, t in run["seconds"].items():
        print(f"   {name:22s} median {t['median'] * 1e3:9.2f} ms  (min {t['min'] * 1e3:9.2f}, max {t['max'] * 1e3:9.2f})")
    for name, value in run["ratios"].items():
        print(f"   {name:46s} {value:6.3f}   (of min: {run['ratios_of_min'][name]:6.3f})")
    for name, value in run["selection_shares"].items():
        print(f"   {name:46s} {value:6.3f}")


if __name__ == "__main__":
    main()
