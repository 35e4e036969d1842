"""MoE layer benchmark: does variable k really save expert compute, and what does the patch cost?

    python bench/bench_moe_layer.py                  # CPU: tiny + medium configs, a 4-layer model
    python bench/bench_moe_layer.py --full-size      # OLMoE-1B-7B shapes, random fp16 weights, GPU

For each config, on one OLMoE MoE block (random weights, the installed transformers' own block):
* routings: native top-8 (``topk`` k=8), variable k with mean k̄ ≈ 4 (``top_p`` with p tuned on the
  block's own router logits to k̄ = 4), ``topk`` k=4;
* per routing and dispatch (``native`` = the model's expert code fed the padded routing,
  ``compact`` = bh_routing.dispatch): the whole patched block and the experts alone;
* the unpatched block as the reference.
Then a small model (or the full-size one): unpatched vs patched tokens/s of a forward pass.
Every variant is timed round-robin (so background load hits all alike); the median of
``--repeats`` is reported, and ratios come from one run. Results also go to bench/results/*.json.

Targets: experts-only at k̄=4 <= 0.6x k=8; whole block <= 0.7x; patched model with topk k=8
>= 0.95x the unpatched model's tokens/s.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bh_routing import dispatch as dsp  # noqa: E402
from bh_routing.patching import RoutingPatch, find_moe_blocks  # noqa: E402
from bh_routing.selection import build_router  # noqa: E402

CONFIGS = {  # name -> (hidden, intermediate, experts, top_k, tokens)
    "tiny": dict(hidden=64, intermediate=32, experts=64, top_k=8, tokens=512),
    "medium": dict(hidden=512, intermediate=256, experts=64, top_k=8, tokens=512),
    "full": dict(hidden=2048, intermediate=1024, experts=64, top_k=8, tokens=512),  # OLMoE-1B-7B
}
OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                   num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                   max_position_embeddings=4096)


# --------------------------------------------------------------------------- helpers


def machine_info(device: torch.device) -> dict:
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "device": str(device),
            "grouped_mm_available": hasattr(torch.nn.functional, "grouped_mm")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def build_model(hidden: int, intermediate: int, experts: int, top_k: int, layers: int, vocab: int,
                dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random-weight OLMoE built directly on ``device`` in ``dtype`` (no fp32 copy on the host)."""
    import transformers
    heads = 16 if hidden == OLMOE_1B_7B["hidden_size"] else max(hidden // 64, 1)
    config = transformers.OlmoeConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=heads, num_experts=experts,
                                      num_experts_per_tok=top_k, vocab_size=vocab, max_position_embeddings=4096,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.OlmoeForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def timed(variants: dict, repeats: int, warmup: int, device: torch.device, min_sample_s: float = 0.02) -> dict:
    """Median seconds per call of each variant, measured round-robin. Fast variants are called
    several times per sample (>= ``min_sample_s``) so that timer and scheduler noise stay small."""
    def run(fn, calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / calls
    samples = {name: [] for name in variants}
    with torch.no_grad():
        calls = {name: max(1, math.ceil(min_sample_s / max(run(fn, 1), 1e-6))) for name, fn in variants.items()}
        for i in range(warmup + repeats):
            for name, fn in variants.items():
                elapsed = run(fn, calls[name])
                if i >= warmup:
                    samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


def tune_top_p(router_logits: torch.Tensor, target_k: float, max_k: int) -> dict:
    """A ``top_p`` config whose mean k on these logits is target_k (bisection on p)."""
    low, high = 1e-4, 1.0
    for _ in range(40):
        p = (low + high) / 2
        mean_k = build_router({"strategy": "top_p", "p": p, "max_k": max_k})(router_logits).counts.float().mean()
        low, high = (p, high) if mean_k < target_k else (low, p)
    return {"strategy": "top_p", "p": round((low + high) / 2, 6), "max_k": max_k}


# --------------------------------------------------------------------------- block benchmark


def bench_block(name: str, shape: dict, args, device, dtype) -> dict:
    model = build_model(shape["hidden"], shape["intermediate"], shape["experts"], shape["top_k"], 1, 256, dtype, device)
    block_info = find_moe_blocks(model)[0]
    block, layout = block_info.module, block_info.layout
    x = torch.randn(1, shape["tokens"], shape["hidden"], device=device, dtype=dtype)
    flat = x.reshape(-1, shape["hidden"])
    with torch.no_grad():
        router_logits = torch.nn.functional.linear(flat, block.gate.weight)  # [T, E]
    k = shape["top_k"]
    routings = {f"k={k}": {"strategy": "topk", "k": k},
                "k~4": tune_top_p(router_logits, 4.0, k),
                "k=4": {"strategy": "topk", "k": 4}}
    variants, experts_only, mean_k = {"unpatched": lambda: block(x)}, {}, {}
    patches = []
    for label, config in routings.items():
        routing = build_router(config)(router_logits, layer=0)
        mean_k[label] = float(routing.counts.float().mean())
        weights = routing.weights.to(x.dtype)
        for mode in ("native", "compact"):
            patch = RoutingPatch(model, config, dispatch=mode, record=False, verbose=False)
            patches.append(patch)
            variants[f"block {label} {mode}"] = (lambda p: lambda: _with(p, lambda: block(x)))(patch)
        cache = {}
        experts_only[f"experts {label} native"] = (
            lambda r, w: lambda: layout.native(block, flat, r.indices, w, False))(routing, weights)
        experts_only[f"experts {label} compact"] = (lambda r: lambda: layout.compact(
            block, flat, dsp.compact_pairs(r.indices, r.weights, r.counts, block_info.num_experts), cache,
            False, None))(routing)
        if layout.name == "fused" and hasattr(torch.nn.functional, "grouped_mm") and device.type == "cpu":
            experts_only[f"experts {label} compact-grouped"] = (lambda r: lambda: _grouped_on_cpu(lambda: layout.compact(
                block, flat, dsp.compact_pairs(r.indices, r.weights, r.counts, block_info.num_experts), cache,
                False, None)))(routing)
    times = timed({**variants, **experts_only}, args.repeats, args.warmup, device)
    ref_block, ref_experts = times["unpatched"], times[f"experts k={k} native"]
    ratios = {}
    for label in routings:
        for mode in ("native", "compact"):
            ratios[f"block {label} {mode} / unpatched"] = times[f"block {label} {mode}"] / ref_block
            ratios[f"experts {label} {mode} / experts k={k} native"] = times[f"experts {label} {mode}"] / ref_experts
    ratios[f"experts k~4 compact / experts k={k} compact"] = times["experts k~4 compact"] / times[f"experts k={k} compact"]
    result = {"config": {**shape, "layout": layout.name, "dtype": str(dtype),
                         "experts_implementation": getattr(model.config, "_experts_implementation", None)},
              "routings": routings, "mean_k": mean_k, "median_seconds": times, "ratios": ratios,
              "targets": {"experts k~4 compact <= 0.6 x experts k=8 native":
                          ratios[f"experts k~4 compact / experts k={k} native"] <= 0.6,
                          "block k~4 compact <= 0.7 x unpatched": ratios["block k~4 compact / unpatched"] <= 0.7}}
    _print_block(name, result)
    return result


def _with(patch, fn):
    with patch:
        return fn()


def _grouped_on_cpu(fn):
    """The grouped GEMM forced on the CPU (the per-expert loop is the CPU default)."""
    dsp.GROUPED_MM_ON_CPU = True
    try:
        return fn()
    finally:
        dsp.GROUPED_MM_ON_CPU = False


def _print_block(name, result):
    cfg = result["config"]
    print(f"\n== MoE block '{name}': hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, "
          f"{cfg['experts']} experts, top-{cfg['top_k']}, {cfg['tokens']} tokens, {cfg['layout']} layout, "
          f"{cfg['dtype']}, experts_implementation={cfg['experts_implementation']}")
    print("   mean k: " + ", ".join(f"{k} {v:.2f}" for k, v in result["mean_k"].items())
          + f"   (k~4 = {result['routings']['k~4']})")
    for variant, seconds in result["median_seconds"].items():
        print(f"   {variant:34s} {seconds * 1e3:9.2f} ms")
    for ratio, value in result["ratios"].items():
        print(f"   {ratio:52s} {value:6.3f}")
    for target, ok in result["targets"].items():
        print(f"   target {target}: {'MET' if ok else 'NOT MET'}")


# --------------------------------------------------------------------------- model benchmark


def bench_model(shape: dict, layers: int, vocab: int, batch: int, args, device, dtype) -> dict:
    model = build_model(shape["hidden"], shape["intermediate"], shape["experts"], shape["top_k"], layers, vocab,
                        dtype, device)
    input_ids = torch.randint(3, vocab, (batch, shape["tokens"]), device=device)
    blocks = find_moe_blocks(model)
    inputs = []  # each MoE block's input in an unpatched forward: tune k~4 per layer on its own logits
    handles = [b.module.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in blocks]
    with torch.no_grad():
        model(input_ids, use_cache=False)
    for handle in handles:
        handle.remove()
    k = shape["top_k"]
    variable = {b.layer: tune_top_p(torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), b.module.gate.weight), 4.0, k)
                for b, x in zip(blocks, inputs)}
    patches = {f"patched topk k={k}": RoutingPatch(model, {"strategy": "topk", "k": k}, record=False, verbose=False),
               f"patched topk k={k} +record": RoutingPatch(model, {"strategy": "topk", "k": k}, verbose=False),
               "patched k~4 compact": RoutingPatch(model, None, layers=variable, record=False, verbose=False),
               "patched topk k=4": RoutingPatch(model, {"strategy": "topk", "k": 4}, record=False, verbose=False)}
    forward = lambda: model(input_ids, use_cache=False)  # noqa: E731
    variants = {"unpatched": forward}
    for label, patch in patches.items():   # a recording patch is cleared after each call, as a sweep does
        clear = patch.recorder.clear if hasattr(patch, "recorder") else (lambda: None)
        variants[label] = (lambda p, clear: lambda: (_with(p, forward), clear()))(patch, clear)
    times = timed(variants, args.repeats, args.warmup, device)
    with torch.no_grad(), RoutingPatch(model, None, layers=variable, verbose=False) as recording:  # the k the model really used
        model(input_ids, use_cache=False)
    mean_k = recording.recorder.counts().mean(axis=1).round(2).tolist()
    tokens = batch * shape["tokens"]
    tokens_per_s = {name: tokens / seconds for name, seconds in times.items()}
    relative = {name: value / tokens_per_s["unpatched"] for name, value in tokens_per_s.items()}
    result = {"config": {**shape, "layers": layers, "vocab": vocab, "batch": batch, "dtype": str(dtype)},
              "variable": variable, "variable_mean_k_per_layer": mean_k, "median_seconds": times, "tokens_per_s": tokens_per_s,
              "relative_to_unpatched": relative,
              "targets": {f"patched topk k={k} >= 0.95 x unpatched tokens/s": relative[f"patched topk k={k}"] >= 0.95}}
    print(f"\n== model: {layers} layers, hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
          f"{shape['experts']} experts, vocab {vocab}, batch {batch} x {shape['tokens']} tokens, {dtype}")
    print(f"   k~4 = top_p with p per layer {[c['p'] for c in variable.values()]}: mean k per layer {mean_k}")
    for name in times:
        print(f"   {name:30s} {times[name] * 1e3:9.1f} ms  {tokens_per_s[name]:10.0f} tok/s  {relative[name]:6.3f}x")
    for target, ok in result["targets"].items():
        print(f"   target {target}: {'MET' if ok else 'NOT MET'}")
    return result


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-size", action="store_true",
                        help="OLMoE-1B-7B shapes (16 layers, vocab 50304), random weights, fp16 on the GPU")
    parser.add_argument("--configs", default="tiny,medium", help="block configs (tiny, medium, full)")
    parser.add_argument("--device", default=None, help="default: cuda for --full-size, else cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 for --full-size, else float32")
    parser.add_argument("--layers", type=int, default=None, help="model layers (default 4; 16 with --full-size)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per block call / sequence length")
    parser.add_argument("--batch", type=int, default=1, help="sequences per model forward")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if args.full_size else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--full-size needs a CUDA GPU (or pass --device cpu --dtype float32 --layers 1 to smoke-test it)")
    dtype = getattr(torch, args.dtype or ("float16" if args.full_size else "float32"))
    names = ["full"] if args.full_size else args.configs.split(",")
    info = machine_info(device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    results = {"machine": info, "args": vars(args), "blocks": {}}
    for name in names:
        shape = {**CONFIGS[name], **({"tokens": args.tokens} if args.tokens else {})}
        results["blocks"][name] = bench_block(name, shape, args, device, dtype)
    if not args.skip_model:
        shape = {**CONFIGS["full" if args.full_size else "medium"], **({"tokens": args.tokens} if args.tokens else {})}
        layers = args.layers or (OLMOE_1B_7B["num_hidden_layers"] if args.full_size else 4)
        vocab = OLMOE_1B_7B["vocab_size"] if args.full_size else 1024
        results["model"] = bench_model(shape, layers, vocab, args.batch, args, device, dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("full_" if args.full_size else "") + f"{device.type}_tf{info['transformers']}"
    path = out / f"moe_layer_{tag}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
