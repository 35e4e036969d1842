"""Time every routing strategy against native top-k routing on the same logits, side by side.

    python bench/bench_selection.py                 # CPU (and GPU too, if one is visible)
    python bench/bench_selection.py --tokens 32768 --repeats 30 --device cuda

Native top-k = what OLMoE's router does after its linear layer: softmax in fp32, then top-8.
Each strategy runs through a prebuilt Router (as the patcher calls it: validation included).
Prints median times and ratios to native; writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bh_routing import Calibration, build_router

STRATEGIES = {
    "topk (ours, k=8)": {"strategy": "topk", "k": 8},
    "top_p 0.5": {"strategy": "top_p", "p": 0.5},
    "threshold 0.02": {"strategy": "threshold", "tau": 0.02},
    "ratio 0.3": {"strategy": "ratio", "beta": 0.3},
    "entropy": {"strategy": "entropy"},
    "bh softmax": {"strategy": "bh", "alpha": 0.05, "pvalues": "softmax"},
    "bh zscore": {"strategy": "bh", "alpha": 0.05, "pvalues": "zscore"},
    "bh pooled": {"strategy": "bh", "alpha": 0.05, "pvalues": "pooled"},
    "bh empirical": {"strategy": "bh", "alpha": 0.05, "pvalues": "empirical"},
    "by empirical": {"strategy": "by", "alpha": 0.05, "pvalues": "empirical"},
}


def native_topk(logits: torch.Tensor, k: int = 8):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)  # [T, N]
    return torch.topk(probs, k, dim=-1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
            f"(torch {torch.__version__})")


def run(device: torch.device, token_counts, repeats: int, dtype: torch.dtype) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(64, generator=g)
    calibration = Calibration.from_router_logits([torch.randn(65536, 64, generator=g) + bias], top_k=8)
    routers = {name: build_router(cfg, calibration) for name, cfg in STRATEGIES.items()}
    rows = []
    for tokens in token_counts:
        logits = (torch.randn(tokens, 64, generator=g) + bias).to(device=device, dtype=dtype)  # [T, N]
        native = median_seconds(lambda: native_topk(logits), device, repeats)
        print(f"\n{device.type} T={tokens}  native top-8: {native * 1e3:.3f} ms")
        for name, router in routers.items():
            layer = 0 if "pooled" in name or "empirical" in name else None
            seconds = median_seconds(lambda: router(logits, layer), device, repeats)
            rows.append({"device": device.type, "machine": machine(device), "tokens": tokens, "experts": 64,
                         "dtype": str(dtype).replace("torch.", ""), "strategy": name,
                         "ms": seconds * 1e3, "native_ms": native * 1e3, "ratio": seconds / native})
            print(f"  {name:18s} {seconds * 1e3:9.3f} ms   {seconds / native:5.2f}x native")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 32768])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="router-logit dtype (the model's dtype on a GPU)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for name in devices:
        device = torch.device(name)
        print(f"== {machine(device)}")
        rows += run(device, args.tokens, args.repeats, getattr(torch, args.dtype))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"selection_{'_'.join(devices)}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
