"""bh_routing command line.

  python -m bh_routing demo                     the whole pipeline, offline, on the bundled tiny OLMoE
                                                (a 2.6 M-parameter pipeline model: it shows the method,
                                                not evidence about OLMoE)
  python -m bh_routing calibrate --model M      one native pass → calibration file for BH p-values
  python -m bh_routing sweep --preset full --model allenai/OLMoE-1B-7B-0924   (into results/full-colab)
  python -m bh_routing report results/full-colab  tables, statistics, figures and REPORT.md

Several processes (one per GPU, or across machines) share one sweep through accelerate's launcher:
  accelerate launch --multi_gpu --num_processes 4 -m bh_routing sweep --preset full --model M --out DIR

A sweep writes every finished run to <out>/results.jsonl at once; run the same command again after
an interruption (a Colab disconnect, Ctrl-C) and it continues where it stopped. A folder holds one
context (model and weights, dtype, calibration, budget, data, version): a sweep of another context
is refused — use another --out, or --restart to move the old folder aside (nothing is deleted).
Everything is also logged to <out>/bh_routing.log.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("bh_routing")
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)  # incl. FolderBusyError, ModelUnavailableError

DEMO_RUNS = [  # (label, config): a cross-section of every idea, small enough for 2 CPU cores
    ("native top-8", {"strategy": "topk", "k": 8}),
    ("top-4", {"strategy": "topk", "k": 4}),
    ("top-2", {"strategy": "topk", "k": 2}),
    ("BH empirical α=0.05", {"strategy": "bh", "pvalues": "empirical", "alpha": 0.05}),
    ("BH empirical α=0.20", {"strategy": "bh", "pvalues": "empirical", "alpha": 0.20}),
    ("BH empirical α=0.50", {"strategy": "bh", "pvalues": "empirical", "alpha": 0.50}),
    ("BH zscore α=0.05", {"strategy": "bh", "pvalues": "zscore", "alpha": 0.05}),
    ("BH softmax α=0.05", {"strategy": "bh", "pvalues": "softmax", "alpha": 0.05}),
    ("top-p 0.3", {"strategy": "top_p", "p": 0.3}),
]
# domains first: held-out text of the bundled model's own training domains, where it is a language model
DEMO_TASKS = ("domains", "wikitext", "hellaswag", "lambada")


def _setup_logging(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "bh_routing.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


def _say(message: str) -> None:
    print(message, flush=True)
    log.info(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def _prepare_folder(args) -> Path:
    """The sweep folder, checked before any work; with --restart the old one is moved aside."""
    from .folder import move_aside
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder: pass a folder path")
    if args.restart:
        moved = move_aside(out)
        if moved:
            print(f"--restart: moved the old {out} aside to {moved}", flush=True)
    _setup_logging(out)
    return out


def _load(args, launch=None):
    from .models import load_model
    if launch is not None and args.device != "auto":
        raise ValueError(f"--device {args.device}: in a launch of {launch.num_processes} processes each uses its "
                         "own device (accelerate assigns it); leave --device at auto")
    device = launch.device if launch is not None else args.device
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
    return model, tokenizer


def _calibration(args, model, tokenizer, folder: Path | None = None, need_logits: bool = False, size_for=None):
    """--calibration, else the folder's own calibration (a resumed sweep), else a calibration pass
    (sized for the smallest alpha of ``size_for``, the sweep's routing configs)."""
    from .experiments import CALIBRATION_FILE, calibrate
    from .pvalues import Calibration
    if getattr(args, "calibration", None):
        _say(f"calibration: {args.calibration}")
        return Calibration.load(args.calibration, model=model), None
    kept = folder / CALIBRATION_FILE if folder is not None else None
    if kept is not None and kept.exists() and not need_logits:
        calibration = Calibration.load(kept, model=model)
        if calibration.metadata.get("max_tokens") == args.calibration_tokens:
            _say(f"calibration: {kept} (this folder's own)")
            return calibration, None
    started = time.time()
    calibration, logits = calibrate(model, tokenizer, max_tokens=args.calibration_tokens, model_id=args.model,
                                    size_for=size_for)
    _say(f"calibrated on {calibration.metadata['tokens']} tokens of {calibration.metadata['data']} "
         f"({time.time() - started:.0f} s)")
    return calibration, logits


def _presets(name: str, budget, calibration, logits):
    from . import experiments as ex, matching
    if name == "full":
        return ex.full_experiments(budget)
    if name == "deep-dive":
        return ex.bh_deep_dive(budget)
    if name == "prompts":
        return ex.prompt_suite(budget)
    if name == "matched":
        if logits is None:
            raise SystemExit("--preset matched searches knobs on calibration logits: run without --calibration")
        return matching.matched_compute(budget, logits, calibration)
    raise SystemExit(f"unknown preset {name!r}")


def cmd_demo(args) -> int:
    from . import experiments as ex, matching
    from .report import build_report
    out = Path(args.out)  # prepared and locked by main()
    started = time.time()
    model, tokenizer = _load(args)
    calibration, logits = _calibration(args, model, tokenizer, out, need_logits=True)
    budget = ex.BUDGETS[args.budget]
    matched = matching.calibrate_to_mean_k({"strategy": "bh", "pvalues": "empirical"}, 4, logits, calibration)
    configs = DEMO_RUNS + [(f"BH empirical @k̄=4 (α={matched['alpha']:.3g})", matched)]
    runs = [ex.Run(label, cfg, task, budget.n_for(task), max_length=budget.max_length, group="demo")
            for task in DEMO_TASKS for label, cfg in configs]
    runs += ex.prompt_suite(budget)
    context = ex.SweepContext(model, tokenizer, args.model, calibration)
    records = ex.run_sweep(context, runs, out, name="demo")
    _time_prompt_routings(context, runs, out, new_tokens=8)   # 8 tokens: ~3 s of the demo's ~60 s (16: ~6 s)
    report = build_report(out).write(out)
    _summarise(records)
    _say(f"\nreport: {report}  ({time.time() - started:.0f} s in all)")
    return 0


def _time_prompt_routings(context, runs, out: Path, new_tokens: int | None = None) -> None:
    """The prompt suite's routings timed interleaved (``prompts.time_routings``; ``new_tokens``
    generated per prompt, default the suite's) into latency.json: the only timing a report draws."""
    from .prompts import LATENCY_FILE, time_routings
    from .store import write_json
    suite = [run for run in runs if run.task == "prompts"]
    if not suite:
        return
    started = time.time()
    timing = time_routings(context.model, context.tokenizer, {run.label: run.routing for run in suite},
                           context.calibration, new_tokens=new_tokens or suite[0].new_tokens)
    write_json(out / LATENCY_FILE, {**timing, "context": context.describe()})
    _say(f"latency: {len(suite)} routings, a warm-up and {timing['repeats']} interleaved rounds "
         f"({time.time() - started:.0f} s) -> {out / LATENCY_FILE}")


def _summarise(records) -> None:
    print(f"\n{'configuration':34s} {'task':9s} {'experts':>7s} {'floor':>6s}  quality")
    for r in records:
        if r["status"] != "ok":
            print(f"{r['label']:34s} {r['task']:9s} FAILED: {r['error']}")
            continue
        metrics = r.get("metrics") or {}
        quality = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith("_stderr"))
        print(f"{r['label'][:34]:34s} {r['task']:9s} {r['experts']['mean_experts']:7.2f} {r['floor_rate']:6.1%}  {quality}")


def cmd_calibrate(args) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder: pass the calibration file's path (e.g. {out / 'calibration.safetensors'})")
    _setup_logging(out.parent)
    model, tokenizer = _load(args)
    calibration, _ = _calibration(args, model, tokenizer)
    calibration.save(out)
    _say(f"wrote {out}")
    return 0


def _plan_sweep(args, model, tokenizer, out: Path):
    """(calibration, runs) of the sweep."""
    from . import experiments as ex
    budget = ex.BUDGETS[args.budget]
    if args.max_new_tokens is not None:  # the prompt suite's generation length, instead of the budget's
        budget = dataclasses.replace(budget, new_tokens=args.max_new_tokens)
    planned = None if args.preset == "matched" else _presets(args.preset, budget, None, None)
    # a fixed preset's smallest alpha sizes the calibration (matched compute searches alpha afterwards)
    calibration, logits = _calibration(args, model, tokenizer, out, need_logits=args.preset == "matched",
                                       size_for=[r.routing for r in planned or []])
    return calibration, planned or _presets(args.preset, budget, calibration, logits)


def cmd_sweep(args) -> int:
    from dataclasses import replace
    from . import experiments as ex
    from .report import build_report
    out, launch = Path(args.out), args.launch  # prepared and locked by main()
    model, tokenizer = _load(args, launch)
    if launch is None:
        calibration, runs = _plan_sweep(args, model, tokenizer, out)
    else:  # one plan, the main process's: every process must hash the same calibration into its run ids
        plan = _plan_sweep(args, model, tokenizer, out) if launch.is_main else None
        calibration, runs = launch.from_main(plan and (replace(plan[0], _device_cache={}), plan[1]))
    if launch is None or launch.is_main:
        processes = f" across {launch.num_processes} processes" if launch else ""
        _say(f"sweep {args.preset}: {len(runs)} runs{processes}, budget {args.budget} → {out}")
    context = ex.SweepContext(model, tokenizer, args.model, calibration)
    ex.run_sweep(context, runs, out, name=args.preset, retry_failed=args.retry_failed, launch=launch)
    if launch is not None:
        launch.wait_for_everyone()  # the report merges every process's runs
    if launch is None or launch.is_main:
        if args.preset == "prompts":
            _time_prompt_routings(context, runs, out)
        _say(f"report: {build_report(out).write(out)}")
    return 0


def cmd_report(args) -> int:
    from .report import build_report
    print(build_report(args.folder).write(args.folder))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bh_routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_options(p, default_out, restart=True):
        p.add_argument("--model", default="tiny", help="'tiny' (bundled), a local folder or a hub id "
                                                       "such as allenai/OLMoE-1B-7B-0924 (default: tiny)")
        p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
        p.add_argument("--dtype", default="auto", help="auto (fp16 on T4, bf16 on Ampere+, fp32 on CPU), fp16, bf16, fp32")
        p.add_argument("--out", default=None, help=f"output (default: {default_out})")
        p.add_argument("--calibration-tokens", type=_positive_int, default=16384,
                       help="tokens of held-out WikiText-2 for the p-value calibration (default 16384)")
        if restart:
            p.add_argument("--restart", action="store_true",
                           help="start over: move an existing --out folder aside to <out>.old-<time> (nothing is deleted)")

    demo = commands.add_parser("demo", help="offline end-to-end demo on the bundled tiny model (a few minutes)")
    model_options(demo, "results/demo-<budget>")
    demo.add_argument("--budget", default="demo", choices=["smoke", "demo"], help="how many items per task")
    demo.set_defaults(run=cmd_demo)

    calibrate = commands.add_parser("calibrate", help="save a calibration file for the empirical/pooled p-values")
    model_options(calibrate, "results/calibration.safetensors", restart=False)
    calibrate.set_defaults(run=cmd_calibrate)

    sweep = commands.add_parser("sweep", help="run a preset sweep (resumable) and write its report")
    model_options(sweep, "results/<preset>-<budget>")
    sweep.add_argument("--preset", required=True, choices=["full", "deep-dive", "matched", "prompts"])
    sweep.add_argument("--budget", default="colab", choices=["smoke", "demo", "colab", "full"],
                       help="items per task: colab fits a free T4 session, full is every item")
    sweep.add_argument("--calibration", help="a calibration file (else calibrate first)")
    sweep.add_argument("--max-new-tokens", type=_positive_int, default=None,
                       help="prompt suite: greedy tokens generated per prompt (default: the budget's, 50 at colab)")
    sweep.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    sweep.set_defaults(run=cmd_sweep)

    report = commands.add_parser("report", help="(re)build tables, figures and REPORT.md of a sweep folder")
    report.add_argument("folder")
    report.set_defaults(run=cmd_report)

    args = parser.parse_args(argv)
    if args.command in ("demo", "sweep") and args.out is None:
        args.out = f"results/{getattr(args, 'preset', 'demo')}-{args.budget}"
    elif args.command == "calibrate" and args.out is None:
        args.out = "results/calibration.safetensors"
    try:
        if args.command not in ("demo", "sweep"):
            return args.run(args)
        from .distributed import current_launch
        from .folder import folder_lock
        args.launch = current_launch() if args.command == "sweep" else None
        if args.launch is not None and not args.launch.is_main:
            args.launch.wait_for_everyone()  # the main process has prepared and locked the folder
            _setup_logging(Path(args.out))
            with folder_lock(args.out, launch=args.launch):  # join the main process's lock
                return args.run(args)
        out = _prepare_folder(args)
        with folder_lock(out, launch=args.launch):  # before loading anything: a second writer is refused at once
            if args.launch is not None:
                args.launch.wait_for_everyone()
            return args.run(args)
    except KeyboardInterrupt:
        print("\ninterrupted — rerun the same command to resume (finished runs are kept)", file=sys.stderr)
        return 130
    except USER_ERRORS as error:  # bad input or state: one clear line, the traceback only in the log
        log.info("failed", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
