"""The sweep report's tables: one row per run (`runs_table`), the paired comparisons of each run with
native top-8 (`comparisons_and_chance`), and the domains task (`domains_table`, `domain_allocation`)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import findings as fd
from .evaluation import TASKS, EvalResult
from .selection import ADAPTIVE_DEFAULTS, STEPUP_DEFAULTS

KNOB_COLUMNS = ("k", "alpha", "pvalues", "temperature", "weights_temperature", "min_k", "max_k", "p", "tau", "beta")
NATIVE_K = 8
FIXED_K_STRATEGIES = ("topk", "topk_renorm", "topk_uniform")   # experts per token fixed by the config


def runs_table(records: list[dict]) -> pd.DataFrame:
    """One row per run record: label, task, strategy, knobs (BH defaults filled in), mean experts,
    floor/ceiling rates, metrics, and two structured roles: ``native`` (top-k at k = 8, the
    reference) and ``target_k`` (a run calibrated to a mean k̄: compared with top-k at that k)."""
    rows = []
    for r in records:
        routing = r.get("routing") or {}
        row = {"run_id": r["run_id"], "label": r["label"], "group": r.get("group", ""), "task": r["task"],
               "strategy": r.get("strategy") or routing.get("strategy"), "status": r["status"],
               "n_items": r.get("n_items", r.get("n")), "max_length": r.get("max_length"),
               "seconds": r.get("seconds"), "tokens_per_s_single_pass": r.get("tokens_per_s"),
               "mean_experts": (r.get("experts") or {}).get("mean_experts"),
               "floor_rate": r.get("floor_rate"), "ceiling_rate": r.get("ceiling_rate"),
               "error": r.get("error")}
        row |= {knob: routing.get(knob) for knob in KNOB_COLUMNS}
        if "per_layer" in routing:
            row["pvalues"] = "per-layer"
        if routing.get("strategy") in ("bh", "by"):  # show the defaults build_router applied
            row |= {knob: default for knob, default in {**ADAPTIVE_DEFAULTS, **STEPUP_DEFAULTS}.items()
                    if row.get(knob) is None}
        row["target_k"] = (routing.get("calibrated") or {}).get("target_k", routing.get("target_k"))
        row["native"] = (row["strategy"] == "topk" and routing.get("k") in (NATIVE_K, None)
                         and row["target_k"] is None)
        row |= {name: value for name, value in (r.get("metrics") or {}).items()}
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["reduction_pct"] = 100.0 * (1.0 - frame["mean_experts"].astype(float) / NATIVE_K)
    return frame


def items_and_length(frame: pd.DataFrame) -> str:
    """'n = 60 items, max_length 256' for the runs of one task."""
    n, length = frame["n_items"].dropna(), frame["max_length"].dropna()
    return (f"n = {int(n.iloc[0]) if len(n) else 'all'} items"
            + (f", max_length {int(length.iloc[0])}" if len(length) else ""))


# --------------------------------------------------------------------------- comparisons


class SavedResults:
    """Each run's saved EvalResult, loaded once; ``available`` names the runs whose files are gone."""

    def __init__(self, folder: Path):
        self.folder, self.cache, self.missing = folder, {}, []

    def __call__(self, run_id: str) -> EvalResult:
        if run_id not in self.cache:
            self.cache[run_id] = EvalResult.load(self.folder / "runs" / run_id)
        return self.cache[run_id]

    def available(self, run_id: str) -> bool:
        try:
            self(run_id)
            return True
        except (OSError, ValueError, KeyError) as error:  # np.load / json: missing or truncated files
            self.missing.append(f"{run_id} ({type(error).__name__})")
            return False


def _comparison(task: str, candidate, reference, load: SavedResults, matched: bool) -> fd.Comparison | None:
    a, b = load(candidate["run_id"]), load(reference["run_id"])
    if not np.array_equal(a.token_ids, b.token_ids) or len(a.items) < 2:
        return None   # different items or max_length: not paired
    column = TASKS[task].outcome.column
    return fd.Comparison(task, candidate["label"], reference["label"], TASKS[task].outcome,
                         a.items[column].to_numpy(float), b.items[column].to_numpy(float),
                         candidate_k=float(candidate["mean_experts"]), reference_k=float(reference["mean_experts"]),
                         matched=matched)


def comparisons_and_chance(runs: pd.DataFrame, load: SavedResults
                           ) -> tuple[list[fd.Comparison], list[fd.ChanceCheck], list[str]]:
    """Per task: every ok run vs native top-8, a calibrated run also vs top-k at its target k̄;
    a chance check of native top-8 on each accuracy headline; notes on tasks that allow no test."""
    comparisons, checks, notes = [], [], []
    ok = runs[(runs["status"] == "ok") & runs["task"].isin(TASKS)]
    for task, frame in ok.groupby("task", sort=False):
        natives = frame[frame["native"]]
        if natives.empty:
            notes.append(f"{task}: native top-8 did not run: nothing to compare with.")
            continue
        native = natives.iloc[0]
        n_items = len(load(native["run_id"]).items)
        if n_items < 2:
            notes.append(f"{task}: {n_items} {TASKS[task].outcome.unit}: no paired test is possible; "
                         "its numbers are descriptive.")
            continue
        headline = TASKS[task].headline
        if headline.chance is not None:
            correct = load(native["run_id"]).items[headline.name].to_numpy(float)
            checks.append(fd.chance_check(task, headline.name, correct, headline.chance))
        for _, run in frame.iterrows():
            if run["run_id"] == native["run_id"]:
                continue
            pairs = [(native, False)]
            if pd.notna(run["target_k"]):
                topk = frame[(frame["strategy"] == "topk") & (frame["k"].astype(float) == float(run["target_k"]))
                             & frame["target_k"].isna()]
                pairs += [(reference, True) for _, reference in topk.head(1).iterrows()
                          if reference["run_id"] != native["run_id"]]
            for reference, matched in pairs:
                comparison = _comparison(task, run, reference, load, matched)
                if comparison is not None:
                    comparisons.append(comparison)
    return comparisons, checks, notes


def per_domain(result: EvalResult) -> pd.DataFrame:
    """One domains-task result per domain: documents, tokens, token perplexity and (with a recorder)
    mean experts per token, token-weighted."""
    rows = []
    for domain, frame in result.items.groupby("domain", sort=False):
        row = {"domain": domain, "documents": len(frame), "tokens": int(frame["n_tokens"].sum()),
               "token_perplexity": math.exp(-frame["logprob"].sum() / frame["n_tokens"].sum())}
        if "experts_per_token" in frame:
            row["mean_experts"] = float(np.average(frame["experts_per_token"], weights=frame["n_tokens"]))
        rows.append(row)
    return pd.DataFrame(rows)


def domains_table(runs: pd.DataFrame, load: SavedResults) -> pd.DataFrame:
    """The domains task: :func:`per_domain` of every ok run, with its label and strategy."""
    frames = [per_domain(load(run["run_id"])).assign(label=run["label"], strategy=run["strategy"])
              for _, run in runs[(runs["status"] == "ok") & (runs["task"] == "domains")].iterrows()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def domain_allocation(runs: pd.DataFrame, load: SavedResults, alpha: float = fd.ALPHA) -> pd.DataFrame:
    """Does an adaptive run give some domains more experts than others? Kruskal–Wallis over the
    documents' mean experts per token across domains, per run whose count is not fixed by its
    configuration (top-k's is), BH over those runs."""
    rows = []
    adaptive = runs[(runs["status"] == "ok") & (runs["task"] == "domains") & ~runs["strategy"].isin(FIXED_K_STRATEGIES)]
    for _, run in adaptive.iterrows():
        items = load(run["run_id"]).items
        if "experts_per_token" not in items:
            continue
        test = fd.across_groups(items["experts_per_token"].to_numpy(float), items["domain"].to_numpy())
        rows.append({"label": run["label"], **test})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["p_adjusted"], frame["differs"] = fd.bh_adjust(frame["pvalue"].to_numpy(float), alpha)
    return frame
