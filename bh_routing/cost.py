"""What a sweep costs before it runs: tokens counted exactly from the evaluator's own requests, the
time derived from an assumed (then measured) throughput, and the memory plan on a Colab T4."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import pandas as pd
import torch

from . import experiments as ex

# =========================================================================== sweeps and cost (notebook 03)

T4_FREE_BYTES = int(14.6 * 2**30)  # free on a fresh Colab T4 runtime (15 GB card less the CUDA context)
# Assumed OLMoE-1B-7B scoring throughput on a T4 in float16 (input tokens per second). Not measured
# (no T4 here): ~2.7 GFLOP per token (1.28 B active parameters, attention, the 50k-vocabulary head at
# scored positions) against the T4's 65 TFLOPS fp16 tensor-core peak, of which small per-expert
# GEMMs (~128 tokens per expert per ~1.2k-token batch) reach perhaps 15–25 TFLOPS; plus 12.9 GB of
# weights read per forward pass at ~300 GB/s (~45 ms) and the routing/dispatch overhead. The
# compute bound is ~7k tokens/s; 2k tokens/s allows ~3.5x for what the arithmetic leaves out.
# Notebook 03 replaces it with the rate it measures on its first run.
T4_TOKENS_PER_S = 2000.0
T4_LOAD_SECONDS = 420.0  # download (~14 GB) and load of OLMoE-1B-7B on a fresh Colab runtime (assumed)


def t4_memory_plan(model_id: str | None = None):
    """The memory plan of OLMoE-1B-7B (float16) on a free Colab T4."""
    from .models import memory_plan, olmoe_1b_7b_config
    return memory_plan(olmoe_1b_7b_config(), T4_FREE_BYTES, torch.float16)


_TOKEN_CACHE: dict = {}


def run_tokens(run: "ex.Run", tokenizer, default_max_length: int = 4096) -> int:
    """Input tokens (non-padding) the evaluator feeds the model for ``run`` — counted exactly by
    building the run's requests (cached per task, items and length)."""
    from .evaluation import TASKS, load_docs
    from .prompt_sets import prompt_set
    if run.task == "prompts":
        return sum(len(tokenizer(p["prompt"])["input_ids"]) for p in prompt_set("categories")) * max(1, run.new_tokens)
    max_length = run.max_length or default_max_length
    key = (id(tokenizer), run.task, run.n, run.seed, max_length)
    if key not in _TOKEN_CACHE:
        docs, _ = load_docs(run.task, n=run.n, seed=run.seed)
        requests = TASKS[run.task].build_requests(docs, tokenizer, max_length, None)
        _TOKEN_CACHE[key] = sum(r.input_length for r in requests)
    return _TOKEN_CACHE[key]


def estimate_sweep(runs: Sequence["ex.Run"], tokenizer, tokens_per_s: float = T4_TOKENS_PER_S,
                   default_max_length: int = 4096) -> pd.DataFrame:
    """Per task: runs, input tokens per run, total tokens and estimated seconds at ``tokens_per_s``
    (empty table for no runs)."""
    columns = ["task", "runs", "tokens_per_run", "tokens", "seconds"]
    if not runs:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame([{"task": run.task, "label": run.label, "tokens": run_tokens(run, tokenizer, default_max_length)}
                          for run in runs])
    table = frame.groupby("task", sort=False).agg(runs=("label", "size"), tokens_per_run=("tokens", "mean"),
                                                  tokens=("tokens", "sum")).reset_index()
    table["seconds"] = table["tokens"] / tokens_per_s
    return table[columns]


MATCHED_STRATEGIES = 5  # matching.matched_compute: 5 adaptive strategies per target (its top-k runs are in the preset)


def matched_runs_for_estimate(budget: "ex.Budget", targets: Sequence[int] = (2, 4, 6, 8),
                              tasks: Sequence[str] = ("wikitext",)) -> list["ex.Run"]:
    """Stand-ins for the runs :func:`bh_routing.matching.matched_compute` adds (same tasks, items
    and lengths), to estimate its cost before its knob search runs."""
    return [ex.Run(f"matched k={k} #{i}", {"strategy": "topk", "k": k}, task, budget.n_for(task),
                   max_length=budget.max_length, group=f"matched k={k}")
            for k in targets for i in range(MATCHED_STRATEGIES) for task in tasks]


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV as a DataFrame; empty (not an error) when the file is missing or has no columns."""
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def format_duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def representative_runs(runs: Sequence["ex.Run"], limit: int = 8) -> list["ex.Run"]:
    """A mix to time before estimating the rest: runs of every task and as many strategies as
    ``limit`` allows, taken round-robin over tasks (the cheapest run alone under-estimates)."""
    per_task: dict[str, list] = {}
    for run in runs:
        strategies = {r.routing.get("strategy") for r in per_task.get(run.task, [])}
        if run.task != "prompts" and run.routing.get("strategy") not in strategies:
            per_task.setdefault(run.task, []).append(run)
    mix = [run for i in range(max(map(len, per_task.values()), default=0))
           for queue in per_task.values() if i < len(queue) for run in [queue[i]]]
    return mix[:limit]


def measured_rate(records: Sequence[Mapping], estimate: pd.DataFrame) -> float | None:
    """Tokens per second of a timed mix: the mix's estimated tokens (``estimate_sweep`` of its runs)
    over the seconds its records took (None if none finished)."""
    seconds = sum(r["seconds"] for r in records if r.get("status") == "ok" and r.get("seconds"))
    return float(estimate["tokens"].sum() / seconds) if seconds else None


def plan_sweep(runs: Sequence["ex.Run"], matched_probe: Sequence["ex.Run"], tokenizer, matched="auto",
               on_t4: bool = False, max_matched_share: float = 0.35) -> tuple[pd.DataFrame, bool, str]:
    """(per-task token/time estimate, whether matched compute runs, the plan in words) for ``runs``
    plus the matched-compute stand-ins ``matched_probe``. ``matched="auto"`` turns matched compute
    on when it adds at most ``max_matched_share`` of the main sweep's tokens."""
    if matched not in ("auto", True, False):
        raise ValueError(f"MATCHED must be True, False or 'auto', got {matched!r}")
    main = estimate_sweep(runs, tokenizer, default_max_length=4096)
    extra = estimate_sweep(matched_probe, tokenizer, default_max_length=4096)
    share = extra["tokens"].sum() / main["tokens"].sum()
    use_matched = share <= max_matched_share if matched == "auto" else matched
    total = main["tokens"].sum() + (extra["tokens"].sum() if use_matched else 0)
    plan = pd.concat([main.assign(part="main sweep"), extra.assign(part="matched compute")], ignore_index=True)
    where = "" if on_t4 else " on a T4 (this machine differs; a measured estimate follows the first runs)"
    text = (f"{len(runs)} runs" + (f" + {len(matched_probe)} matched-compute runs" if use_matched else "")
            + f": **{total / 1e6:.2f} M tokens**. At the assumed T4 rate of {T4_TOKENS_PER_S:,.0f} tokens/s "
            f"that is **{format_duration(total / T4_TOKENS_PER_S)}**{where}. Matched compute adds "
            f"{share:.0%} → {'on' if use_matched else 'off'} (MATCHED = {matched!r}).")
    return plan, use_matched, text


def describe_remaining(timed: Sequence[Mapping], mix: Sequence["ex.Run"], runs: Sequence["ex.Run"],
                       tokenizer) -> str:
    """The time the rest of ``runs`` will take at the rate measured on the ``timed`` records of
    ``mix`` (empty when no rate could be measured)."""
    measured = measured_rate(timed, estimate_sweep(mix, tokenizer, default_max_length=4096))
    if not measured:
        return ""
    rest = estimate_sweep([r for r in runs if r not in mix], tokenizer, tokens_per_s=measured,
                          default_max_length=4096)
    return (f"measured {measured:,.0f} tokens/s over a mix of {len(mix)} runs -> about "
            f"{format_duration(rest['seconds'].sum())} for the remaining runs (finished runs are skipped)")
