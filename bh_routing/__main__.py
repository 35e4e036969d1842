"""Command line: ``python -m bh_routing demo`` (the README's main command).

The demo runs offline on the bundled tiny trained OLMoE and bundled WikiText-2: it calibrates the
p-value models on the router logits of the first half of the token budget, then reports how many
experts each routing strategy selects on the second half (per layer, with floor/ceiling hit rates).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

DEMO_STRATEGIES = [
    {"name": "native top-8", "strategy": "topk", "k": 8},
    {"name": "top-p 0.5", "strategy": "top_p", "p": 0.5, "max_k": 8},
    {"name": "BH softmax α=0.05", "strategy": "bh", "pvalues": "softmax", "alpha": 0.05, "max_k": 8},
    {"name": "BH zscore α=0.05", "strategy": "bh", "pvalues": "zscore", "alpha": 0.05, "max_k": 8},
    {"name": "BH pooled α=0.05", "strategy": "bh", "pvalues": "pooled", "alpha": 0.05, "max_k": 8},
    {"name": "BH empirical α=0.05", "strategy": "bh", "pvalues": "empirical", "alpha": 0.05, "max_k": 8},
    {"name": "BH empirical α=0.20", "strategy": "bh", "pvalues": "empirical", "alpha": 0.20, "max_k": 8},
    {"name": "BY empirical α=0.05", "strategy": "by", "pvalues": "empirical", "alpha": 0.05, "max_k": 8},
]


def router_logits_of(model, input_ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Per-layer router logits [T, N] of a token stream, in windows of ``window`` tokens."""
    per_layer: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, input_ids.numel(), window):
            chunk = input_ids[start:start + window][None].to(model.device)  # [1, S]
            out = model(chunk, output_router_logits=True)
            for layer, logits in enumerate(out.router_logits):
                if len(per_layer) <= layer:
                    per_layer.append([])
                per_layer[layer].append(logits.reshape(-1, logits.shape[-1]).float().cpu())
    return [torch.cat(chunks) for chunks in per_layer]


def demo(args) -> int:
    from . import Calibration, build_router
    from .data import load_wikitext_documents
    from .models import load_model

    started = time.time()
    model, tokenizer = load_model(args.model)
    documents = load_wikitext_documents()
    text = "".join(record["page"] for record in documents.records)
    ids = torch.tensor(tokenizer(text[: args.tokens * 12])["input_ids"][: 2 * args.tokens])
    calibration_ids, eval_ids = ids[: args.tokens], ids[args.tokens:]
    print(f"model {args.model}: {model.config.num_hidden_layers} layers, {model.config.num_experts} experts, "
          f"top-{model.config.num_experts_per_tok}; WikiText-2 test: {calibration_ids.numel()} calibration + "
          f"{eval_ids.numel()} evaluation tokens")
    calibration = Calibration.from_router_logits(
        router_logits_of(model, calibration_ids, args.window), top_k=model.config.num_experts_per_tok,
        metadata={"model": args.model, "data": "wikitext-2-raw-v1 test (bundled)", "tokens": args.tokens})
    eval_logits = router_logits_of(model, eval_ids, args.window)
    rows = []
    for config in DEMO_STRATEGIES:
        router = build_router(config, calibration)
        counts = torch.stack([router(logits, layer).counts for layer, logits in enumerate(eval_logits)])  # [L, T]
        rows.append({"strategy": config["name"], "config": config, "mean_experts": counts.float().mean().item(),
                     "per_layer": counts.float().mean(dim=1).tolist(),
                     "floor_rate": (counts == router.min_k).float().mean().item(),
                     "ceiling_rate": (counts == router.max_k).float().mean().item()})
    print(f"\n{'strategy':22s} {'mean k':>7s} {'floor':>6s} {'ceiling':>8s}   per layer")
    for row in rows:
        print(f"{row['strategy']:22s} {row['mean_experts']:7.2f} {row['floor_rate']:6.1%} {row['ceiling_rate']:8.1%}"
              f"   {' '.join(f'{k:.1f}' for k in row['per_layer'])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "data": "wikitext-2-raw-v1 test (bundled), first tokens of the documents",
              "calibration_tokens": int(calibration_ids.numel()), "eval_tokens": int(eval_ids.numel()),
              "window": args.window, "torch": torch.__version__, "python": platform.python_version(),
              "seconds": round(time.time() - started, 1), "results": rows}
    (out / "demo_routing.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    calibration.save(out / "calibration.safetensors")
    print(f"\nwrote {out / 'demo_routing.json'} and the calibration ({time.time() - started:.0f} s)")
    print("floor = share of token-layers at min_k (BH found fewer); ceiling = share at max_k.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bh_routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="offline demo on the bundled tiny model and WikiText-2")
    run.add_argument("--model", default="tiny", help="'tiny' (bundled), a local path or a hub id")
    run.add_argument("--tokens", type=int, default=4096, help="calibration tokens (the same again are evaluated)")
    run.add_argument("--window", type=int, default=512, help="tokens per forward pass")
    run.add_argument("--out", default="results/demo", help="output folder")
    args = parser.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
