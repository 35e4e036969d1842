"""The evaluator against lm-eval's HFLM on the same model, documents and scores, side by side.

    python bench/bench_vs_lm_eval.py --threads 1,2 --repeats 3

Per thread count and round, every task runs through ``evaluate(backend="native")`` and
``evaluate(backend="lm-eval")`` with HFLM at batch size 1 (its default) and 8, one after the
other; each keeps its fastest round (the least disturbed on a shared machine). Wall time includes
each side's tokenisation and bookkeeping: what a user waits for. The metrics must agree (largest
relative difference reported). Target: the evaluator >= 1.7x lm-eval overall. Writes bench/results/vs_lm_eval_cpu_<stamp>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_eval import load  # noqa: E402
from bench_moe_layer import machine_info  # noqa: E402
from bh_routing import evaluation as ev  # noqa: E402

TASKS = {"hellaswag": 50, "lambada": 100, "wikitext": 2}   # items (WikiText: articles) by default


SIDES = {"evaluator": ("native", "auto"), "lm-eval b1": ("lm-eval", 1), "lm-eval b8": ("lm-eval", 8)}


def timed_evaluate(model, tokenizer, task: str, n: int, side: str):
    backend, batch_size = SIDES[side]
    started = time.perf_counter()
    result = ev.evaluate(model, tokenizer, task, n=n, source="bundled", backend=backend, batch_size=batch_size)
    return time.perf_counter() - started, result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    for task, n in TASKS.items():
        parser.add_argument(f"--{task}", type=int, default=n, help=f"items (default {n})")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    tasks = {task: getattr(args, task) for task in TASKS}
    for task, n in tasks.items():
        if n < 1:
            parser.error(f"--{task} must be at least 1 (items to evaluate), got {n}")
    model, tokenizer, name = load("tiny", "cpu", 256)
    report = {"model": name, "machine": machine_info(torch.device("cpu")), "args": vars(args), "runs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"vs_lm_eval_cpu_{time.strftime('%Y%m%d-%H%M%S')}.json"
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for task in tasks:  # warm-up
            ev.evaluate(model, tokenizer, task, n=2, source="bundled")
        seconds = {(task, side): [] for task in tasks for side in SIDES}
        metrics = {}
        for _ in range(args.repeats):
            for task, n in tasks.items():
                for side in SIDES:
                    elapsed, result = timed_evaluate(model, tokenizer, task, n, side)
                    seconds[task, side].append(elapsed)
                    metrics[task, side] = result.metrics
        rows = []
        for task in tasks:
            best = {side: min(seconds[task, side]) for side in SIDES}
            ours = metrics[task, "evaluator"]
            delta = {side: max(abs(ours[k] - metrics[task, side][k]) / max(abs(metrics[task, side][k]), 1e-12)
                               for k in ours if k in metrics[task, side] and not k.endswith("stderr"))
                     for side in SIDES if side != "evaluator"}
            rows.append({"task": task, "items": tasks[task], "best_seconds": best,
                         "speedup": {side: best[side] / best["evaluator"] for side in SIDES if side != "evaluator"},
                         "all_seconds": {side: seconds[task, side] for side in SIDES},
                         "metrics": ours, "max_relative_metric_delta": delta})
            print(f"threads {threads} {task:9s} " + " | ".join(f"{side} {best[side]:6.2f} s" for side in SIDES)
                  + " | " + ", ".join(f"x{v:.2f} vs {side}" for side, v in rows[-1]["speedup"].items())
                  + f" | max rel. metric delta {max(delta.values()):.1e}", flush=True)
        overall = {side: sum(r["best_seconds"][side] for r in rows) / sum(r["best_seconds"]["evaluator"] for r in rows)
                   for side in SIDES if side != "evaluator"}
        print(f"threads {threads} overall " + ", ".join(f"x{v:.2f} vs {side}" for side, v in overall.items())
              + " (target >= 1.7)", flush=True)
        report["runs"].append({"threads": threads, "tasks": rows, "overall_speedup": overall,
                               "target_met": min(overall.values()) >= 1.7})
        report["machine"]["load_average_end"] = os.getloadavg()
        path.write_text(json.dumps(report, indent=1, default=str))  # after each thread count: nothing lost
        print(f"wrote {path}", flush=True)
    return report


if __name__ == "__main__":
    main()
