"""The engine's prompt suite against the seed notebooks' design, on the same model, side by side.

    python bench/bench_sweep.py                    # bundled tiny model, 5 seed configs × 12 prompts
    python bench/bench_sweep.py --new-tokens 50 --model tiny

Seed design: for each configuration and each prompt, one `generate` of N greedy tokens, then
Python-level statistics over the recorded (layer, token) rows. Engine: `experiments.execute_prompts`
(`prompts.score_prompts`: each prompt teacher-forced by the evaluation engine, then
the 12 prompts generated in one left-padded batch, statistics vectorised). Prints tokens/s of both, the
ratio, and whether the generated tokens are the same; writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bh_routing import experiments as ex
from bh_routing.prompt_sets import prompt_set
from bh_routing.models import load_model
from bh_routing.patching import RoutingPatch


def seed_design(context: ex.SweepContext, config: dict, new_tokens: int) -> tuple[list[list[int]], float, int]:
    """One prompt at a time; stats by a Python loop over recorded rows. Returns (tokens, seconds, n_new)."""
    model, tokenizer = context.model, context.tokenizer
    outputs, generated = [], 0
    started = time.perf_counter()
    for prompt in prompt_set("categories"):
        batch = tokenizer(prompt["prompt"], return_tensors="pt").to(model.device)
        with RoutingPatch(model, config, calibration=context.calibration, verbose=False) as patch, torch.no_grad():
            out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            rows = patch.recorder.to_frame(experts=False)
        total = 0
        for count in rows["count"]:  # the seed's per-row Python statistics
            total += int(count)
        _ = total / max(len(rows), 1)
        new = out[0, batch["input_ids"].shape[1]:].tolist()
        outputs.append(new)
        generated += len(new)
    return outputs, time.perf_counter() - started, generated


def engine(context: ex.SweepContext, config: dict, label: str, new_tokens: int) -> tuple[list[list[int]], float, int]:
    run = ex.Run(label, config, "prompts", new_tokens=new_tokens)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        record = ex.execute_prompts(context, run, Path(folder) / "run")
        seconds = time.perf_counter() - started
    tokenizer = context.tokenizer
    outputs = [tokenizer(p["continuation"], add_special_tokens=False)["input_ids"] for p in record["prompts"]]
    return outputs, seconds, record["generated_tokens"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, verbose=False)
    calibration, _ = ex.calibrate(model, tokenizer, max_tokens=args.calibration_tokens, model_id=args.model)
    context = ex.SweepContext(model, tokenizer, args.model, calibration)
    rows = []
    for label, config in ex.SEED_PROMPT_CONFIGS.items():
        engine(context, config, label, 2)  # warm-up
        seed_out, seed_s, seed_n = seed_design(context, config, args.new_tokens)
        eng_out, eng_s, eng_n = engine(context, config, label, args.new_tokens)
        same = sum(tokenizer.decode(a, skip_special_tokens=True) == tokenizer.decode(b, skip_special_tokens=True)
                   for a, b in zip(seed_out, eng_out))
        rows.append({"config": label, "seed_tokens_per_s": seed_n / seed_s, "engine_tokens_per_s": eng_n / eng_s,
                     "speedup": (eng_n / eng_s) / (seed_n / seed_s), "same_outputs": f"{same}/{len(seed_out)}",
                     "new_tokens": args.new_tokens})
        print(f"{label:12s} seed {seed_n / seed_s:8.1f} tok/s   engine {eng_n / eng_s:8.1f} tok/s   "
              f"{rows[-1]['speedup']:5.2f}x   same outputs {same}/{len(seed_out)}")
    seed_total = sum(r["new_tokens"] * 12 / r["seed_tokens_per_s"] for r in rows)
    engine_total = sum(r["new_tokens"] * 12 / r["engine_tokens_per_s"] for r in rows)
    summary = {"model": args.model, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
               "torch": torch.__version__, "overall_speedup": seed_total / engine_total, "rows": rows}
    print(f"overall: {summary['overall_speedup']:.2f}x ({summary['machine']})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_cpu.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
