"""Sweep results as tables (notebook 03): one row per run with each task's metrics, the matched-
compute table, and runs that are new to a sweep."""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pandas as pd

from . import experiments as ex, matching
from .evaluation import TASKS as EVAL_TASKS

QUALITY_COLUMNS = {(task, metric.name): f"{task}_{metric.name}"   # (task, metric) -> comparison-table column
                   for task, spec in EVAL_TASKS.items() for metric in spec.metrics}
HEADLINE_COLUMNS = tuple(f"{task}_{spec.headline.name}" for task, spec in EVAL_TASKS.items())  # one per task


def comparison_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (label): group, strategy, mean experts (mean over the tasks it ran
    on, and per task), WikiText word perplexity, HellaSwag acc/acc_norm, LAMBADA acc and perplexity,
    floor/ceiling rates — from :func:`bh_routing.report_tables.runs_table`."""
    ok = runs[runs["status"] == "ok"]
    rows = {}
    for _, run in ok.iterrows():
        row = rows.setdefault(run["label"], {"label": run["label"], "group": run["group"], "strategy": run["strategy"]})
        row[f"experts_{run['task']}"] = run["mean_experts"]
        for (task, metric), column in QUALITY_COLUMNS.items():
            if run["task"] == task and metric in run and pd.notna(run[metric]):
                row[column] = run[metric]
        row.setdefault("_floor", []).append(run["floor_rate"])
        row.setdefault("_ceiling", []).append(run["ceiling_rate"])
    table = pd.DataFrame(list(rows.values()))
    if table.empty:
        return table
    expert_columns = [c for c in table if c.startswith("experts_")]
    table.insert(3, "mean_experts", table[expert_columns].mean(axis=1))
    table["floor_rate"] = table.pop("_floor").map(lambda v: float(np.nanmean(np.asarray(v, dtype=float))))
    table["ceiling_rate"] = table.pop("_ceiling").map(lambda v: float(np.nanmean(np.asarray(v, dtype=float))))
    ordered = ["label", "group", "strategy", "mean_experts", *[c for c in QUALITY_COLUMNS.values() if c in table],
               "floor_rate", "ceiling_rate", *expert_columns]
    return table[ordered].sort_values(["group", "mean_experts"], kind="stable").reset_index(drop=True)


def _family(row) -> str:
    """A run's strategy family from its routing knobs: 'top-k', 'BH empirical', 'top_p', ..."""
    if row["strategy"] in ("bh", "by"):
        return f"{'BH' if row['strategy'] == 'bh' else 'BY'} {row.get('pvalues') or 'empirical'}"
    return "top-k" if row["strategy"] == "topk" else str(row["strategy"])


def new_runs(existing: Sequence["ex.Run"], extra: Sequence["ex.Run"]) -> list["ex.Run"]:
    """The runs of ``extra`` that do not repeat a run of ``existing`` (same routing, task, items,
    length): matched compute's top-k references are already in the full preset."""
    def key(run):
        return (json.dumps(run.routing, sort_keys=True, default=str), run.task, run.n, run.seed, run.max_length,
                run.new_tokens)
    seen = {key(run) for run in existing}
    return [run for run in extra if key(run) not in seen]


def matched_table(runs: pd.DataFrame, metric: str = "word_perplexity", task: str = "wikitext") -> pd.DataFrame:
    """Matched compute on ``task``: per target k̄ the adaptive strategies calibrated to it (their
    ``target_k``) and top-k at k = k̄: ``target_k``, ``family``, ``label``, achieved ``mean_experts``
    and ``metric`` (descriptive; the report's findings say which differences are supported)."""
    ok = runs[(runs["status"] == "ok") & (runs["task"] == task)]
    matched = ok[ok["target_k"].notna()]
    if matched.empty:
        return pd.DataFrame(columns=["target_k", "family", "label", "mean_experts", metric])
    frames = [matched]
    topk = ok[(ok["strategy"] == "topk")]
    for target in sorted(matched["target_k"].unique()):
        if not (matched["target_k"].eq(target) & matched["strategy"].eq("topk")).any():
            reference = topk[topk["k"].astype(float) == target].head(1)
            frames.append(reference.assign(target_k=target))
    frame = pd.concat(frames, ignore_index=True)
    frame["family"] = frame.apply(_family, axis=1)
    return (frame[["target_k", "family", "label", "mean_experts", metric]]
            .sort_values(["target_k", "family"]).reset_index(drop=True))


def matched_knobs(runs) -> pd.DataFrame:
    """Per matched-compute run: the target mean k, what its knob achieved on calibration text, and
    the knob's value (runs of :func:`bh_routing.matching.matched_compute`)."""
    return pd.DataFrame([{"label": r.label, "target k̄": r.routing["calibrated"]["target_k"],
                          "achieved on calibration": r.routing["calibrated"]["achieved_k"],
                          r.routing["calibrated"]["knob"]: r.routing[r.routing["calibrated"]["knob"]]}
                         for r in runs if "calibrated" in r.routing])


def show_matched_runs(session, runs: Sequence["ex.Run"], calibration, calibration_logits, targets) -> list["ex.Run"]:
    """Matched compute (notebook 03): the knob (α, p, τ, β) giving each target mean k on (a seeded
    subsample of) the calibration text, shown as a table; returns the runs new to ``runs``."""
    from .bh_diagnostics import subsample
    from .session import MATCHED_SEARCH_TOKENS
    search = [logits.to(session.device) for logits in
              subsample(calibration_logits, MATCHED_SEARCH_TOKENS[session.budget_name], session.seed)]
    matched = new_runs(runs, matching.matched_compute(session.budget, search, calibration, ("wikitext",), targets))
    session.table(matched_knobs(matched), "Matched compute: the knobs", digits=4)
    return matched


def show_matched(session, report) -> pd.DataFrame:
    """The matched-compute table of a sweep's report (CSV and figure; descriptive)."""
    from .routing_plots import plot_matched_compute
    matched = matched_table(report.ok)
    if len(matched):
        session.table(matched, "Matched compute (WikiText, descriptive)", digits=4, csv="matched_compute")
        session.figure(plot_matched_compute(matched, subtitle=session.subtitle), "matched_compute",
                       "Matched compute: each strategy at its target k̄ beside top-k (descriptive).")
    return matched
