"""Turn a sweep folder into tables, statistics, figures and REPORT.md.

``results/<run-name>/`` after :func:`build_report`:
  results.jsonl          one record per run (written by the sweep)
  runs.csv               one row per run: config knobs, mean experts, floor/ceiling, quality, speed
  experts_per_layer.csv  mean experts per token per layer and run
  comparison.csv         each run vs native top-8 on the same task: paired tests, each with its unit
  prompts.csv            prompt-suite runs: one row per prompt and configuration
  analysis_summary.json  the headline numbers with the context (model, data, settings) behind them
  *.png                  figures; REPORT.md embeds them

Read-only on the results: ``results.jsonl`` is never written (damaged lines are skipped and named;
the next sweep sets them aside), and only the records of the folder's context are reported — any
others (a folder from before contexts were stored) are counted and named in REPORT.md.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import analysis, plots
from .selection import ADAPTIVE_DEFAULTS, STEPUP_DEFAULTS
from .folder import PER_TASK_KEYS, read_context
from .store import latest_by_run, read_results, write_atomic, write_json

QUALITY = {  # task -> (metric, higher is better): the number a Pareto plot of that task shows
    "wikitext": ("word_perplexity", False),
    "hellaswag": ("acc_norm", True),
    "lambada": ("acc", True),
}
KNOB_COLUMNS = ("k", "alpha", "pvalues", "temperature", "weights_temperature", "min_k", "max_k", "p", "tau", "beta")


def runs_table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        routing = r.get("routing") or {}
        row = {"run_id": r["run_id"], "label": r["label"], "group": r.get("group", ""), "task": r["task"],
               "strategy": r.get("strategy") or routing.get("strategy"), "status": r["status"],
               "n_items": r.get("n_items", r.get("n")), "max_length": r.get("max_length"),
               "seconds": r.get("seconds"), "tokens_per_s": r.get("tokens_per_s"),
               "mean_experts": (r.get("experts") or {}).get("mean_experts"),
               "floor_rate": r.get("floor_rate"), "ceiling_rate": r.get("ceiling_rate"),
               "error": r.get("error")}
        row |= {knob: routing.get(knob) for knob in KNOB_COLUMNS}
        if "per_layer" in routing:
            row["pvalues"] = "per-layer"
        if routing.get("strategy") in ("bh", "by"):  # show the defaults build_router applied
            row |= {knob: default for knob, default in {**ADAPTIVE_DEFAULTS, **STEPUP_DEFAULTS}.items()
                    if row.get(knob) is None}
        row["target_k"] = (routing.get("calibrated") or {}).get("target_k")
        row |= {name: value for name, value in (r.get("metrics") or {}).items()}
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["reduction_pct"] = 100.0 * (1.0 - frame["mean_experts"].astype(float) / 8)
    return frame


def _is_native(row) -> bool:
    return row["strategy"] == "topk" and row.get("k") in (8, None)


def _load_result(folder: Path, run_id: str, missing: list[str]):
    """The run's saved EvalResult, or None (named in ``missing``) when its files are gone or damaged."""
    from .evaluation import EvalResult
    try:
        return EvalResult.load(folder / "runs" / run_id)
    except (OSError, ValueError, KeyError) as error:  # np.load / json: missing or truncated files
        missing.append(f"{run_id} ({type(error).__name__})")
        return None


def paired_comparisons(folder: Path, runs: pd.DataFrame, missing: list[str] | None = None) -> pd.DataFrame:
    """Every ok run against native top-8 on the same task, on the same items/tokens. Runs whose
    saved results are missing are skipped and listed in ``missing`` (a resumed sweep redoes them)."""
    missing = [] if missing is None else missing
    rows = []
    ok = runs[runs["status"] == "ok"]
    for task, frame in ok[ok["task"].isin(QUALITY)].groupby("task"):
        natives = frame[frame.apply(_is_native, axis=1)]
        if natives.empty:
            continue
        base = _load_result(folder, natives.iloc[0]["run_id"], missing)
        if base is None:
            continue
        for _, run in frame.iterrows():
            if run["run_id"] == natives.iloc[0]["run_id"]:
                continue
            other = _load_result(folder, run["run_id"], missing)
            if other is None:
                continue
            if not np.array_equal(base.token_ids, other.token_ids):
                continue  # different items or max_length: not paired
            row = {"task": task, "label": run["label"], "strategy": run["strategy"],
                   "mean_experts": run["mean_experts"]}
            boot = analysis.bootstrap_perplexity_ratio(base.token_logprobs, other.token_logprobs,
                                                       groups=base.token_item, group_unit="item")
            row |= {"ppl_ratio": boot["ratio"], "ppl_ratio_ci_low": boot["ci_low"],
                    "ppl_ratio_ci_high": boot["ci_high"], "ppl_ratio_unit": boot["unit"]}
            metric = {"wikitext": "logprob", "hellaswag": "acc_norm", "lambada": "acc"}[task]
            if len(base.items) >= 2:
                test = analysis.paired_comparison(base.items[metric].to_numpy(float),
                                                  other.items[metric].to_numpy(float), unit=f"item ({metric})")
                row |= {f"{key}": test[key] for key in ("unit", "n", "mean_difference", "ci_low", "ci_high",
                                                        "t_pvalue", "wilcoxon_pvalue", "cohens_dz")}
            rows.append(row)
    return pd.DataFrame(rows)


def prompts_table(records: list[dict]) -> pd.DataFrame:
    rows = [{"label": r["label"], **p} for r in records if r["task"] == "prompts" and r["status"] == "ok"
            for p in r["prompts"]]
    return pd.DataFrame(rows)


def _markdown(frame: pd.DataFrame, columns: list[str], digits: int = 3) -> str:
    frame = frame[[c for c in columns if c in frame]]
    if frame.empty:
        return "_(none)_\n"
    def cell(v):
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "–" if v is None else escape(v)
    lines = ["| " + " | ".join(escape(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def escape(value) -> str:
    """Text safe inside a Markdown table cell: no HTML, no column break, one line."""
    return html.escape(str(value)).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _budget(frame: pd.DataFrame) -> str:
    """'n = 60 items, max_length 256' for the runs of one task."""
    n, length = frame["n_items"].dropna(), frame["max_length"].dropna()
    return (f"n = {int(n.iloc[0]) if len(n) else 'all'} items"
            + (f", max_length {int(length.iloc[0])}" if len(length) else ""))


def _figures(folder: Path, runs: pd.DataFrame, prompts: pd.DataFrame, subtitle: str) -> list[tuple[str, str]]:
    ok = runs[runs["status"] == "ok"].copy()
    made = []

    def keep(name, fig, caption):
        plots.save(fig, folder / f"{name}.png")
        made.append((f"{name}.png", caption))

    for task, (metric, higher) in QUALITY.items():
        frame = ok[(ok["task"] == task)].dropna(subset=["mean_experts"])
        if metric in frame and len(frame) >= 2:
            keep(f"pareto_{task}", plots.plot_pareto(frame, quality=metric, higher_is_better=higher, dataset=None,
                                                     subtitle=f"{subtitle} · {_budget(frame)}", title=f"{task}: {metric} vs mean active experts"),
                 f"{task}: quality vs mean active experts; the staircase is the Pareto frontier.")
    first = ok[ok["task"] == ok["task"].iloc[0]] if not ok.empty else ok
    if len(first) >= 2:
        where = f"{subtitle} · {first['task'].iloc[0]}, {_budget(first)}"
        keep("experts_by_config", plots.plot_experts_by_config(first, subtitle=where),
             "Mean active experts per token by configuration.")
        keep("speed_by_config", plots.plot_latency_by_config(first, metric="tokens_per_s", subtitle=where),
             "Throughput (input tokens/s) by configuration.")
    alpha = ok[ok["group"].str.startswith("alpha/")]
    if len(alpha) >= 2:
        keep("alpha_sensitivity", plots.plot_alpha_sensitivity(alpha, metrics=("mean_experts", "floor_rate"),
                                                              subtitle=subtitle), "BH: α vs mean experts, per p-value model.")
    temperature = ok[ok["group"] == "temperature/softmax"]
    if len(temperature) >= 2:
        keep("temperature_sensitivity", plots.plot_temperature_sensitivity(temperature, metrics=("floor_rate",),
                                                                          subtitle=subtitle),
             "BH on softmax p-values: temperature vs the share of tokens BH leaves on the floor.")
    weights = ok[ok["group"] == "weights temperature"]
    if len(weights) >= 2:
        quality = [m for m in ("word_perplexity", "acc_norm", "acc") if m in weights and weights[m].notna().any()][:1]
        keep("weights_temperature", plots.plot_temperature_sensitivity(weights, metrics=quality or ("mean_experts",),
                                                                      x="weights_temperature", hue=None, subtitle=subtitle),
             "BH: mixing-weights temperature at a fixed selection vs quality.")
    grid = ok[ok["group"] == "alpha x max_k"]
    if len(grid) >= 2:
        keep("alpha_maxk_heatmap", plots.plot_alpha_maxk_heatmap(grid, subtitle=subtitle), "BH: mean experts over α × max_k.")
    if not prompts.empty:
        keep("experts_by_category", plots.plot_experts_by_category(prompts, value="mean_experts", subtitle=subtitle),
             "Prompt suite: mean experts per token by prompt category.")
    return made


def _settings(record: dict) -> dict:
    return ({"new_tokens": record.get("new_tokens")} if record["task"] == "prompts"
            else {"n": record.get("n"), "max_length": record.get("max_length"), "seed": record.get("seed")})


def of_one_context(records: list[dict], stored: dict | None) -> tuple[list[dict], list[dict], dict]:
    """(records of the folder's context, the others, that context). Without a stored context (an old
    folder) the newest record's context and, per task, the newest record's budget are the folder's."""
    if stored is None:
        newest = records[-1].get("context") or {}
        stored = {**newest, "budget": {r["task"]: _settings(r) for r in records}}  # the newest wins per task
    shared = {key: value for key, value in stored.items() if key not in PER_TASK_KEYS}
    normal = json.loads(json.dumps(shared, sort_keys=True, default=str))
    kept, other = [], []
    for record in records:
        same = (json.loads(json.dumps(record.get("context") or {}, sort_keys=True, default=str)) == normal
                and (stored.get("budget") or {}).get(record["task"], _settings(record)) == _settings(record))
        (kept if same else other).append(record)
    return kept, other, shared


def build_report(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass a sweep's --out folder")
    records, damaged = read_results(folder)
    records = list(latest_by_run(records).values())
    if not records:
        raise FileNotFoundError(f"{folder} holds no usable results.jsonl records: run a sweep into it first"
                                + (f" ({len(damaged)} damaged line(s): {damaged[0]})" if damaged else ""))
    sweep = json.loads((folder / "sweep.json").read_text()) if (folder / "sweep.json").exists() else {}
    records, excluded, context = of_one_context(records, read_context(folder))
    runs = runs_table(records)
    prompts = prompts_table(records)
    missing: list[str] = []
    comparison = paired_comparisons(folder, runs, missing)
    runs.to_csv(folder / "runs.csv", index=False)
    comparison.to_csv(folder / "comparison.csv", index=False)
    if not prompts.empty:
        prompts.drop(columns=["text"]).to_csv(folder / "prompts.csv", index=False)
    per_layer = [{"label": r["label"], "task": r["task"], "layer": layer, "mean_experts": k}
                 for r in records if r["status"] == "ok"
                 for layer, k in enumerate((r.get("experts") or {}).get("mean_experts_per_layer", []))]
    pd.DataFrame(per_layer).to_csv(folder / "experts_per_layer.csv", index=False)
    versions = next((r.get("versions") for r in records if r.get("versions")), {})
    subtitle = f"{context.get('model_id')} · {context.get('dtype', '').replace('torch.', '')}"
    figures = _figures(folder, runs, prompts, subtitle)

    ok, failed = runs[runs["status"] == "ok"], runs[runs["status"] == "failed"]
    headline = []
    for task, (metric, higher) in QUALITY.items():
        frame = ok[ok["task"] == task].dropna(subset=["mean_experts"])
        if metric not in frame or frame.empty:
            continue
        front = frame.iloc[plots.pareto_front(frame[["mean_experts", metric]].to_numpy(float), higher)]
        native = frame[frame.apply(_is_native, axis=1)]
        headline.append({"task": task, "metric": metric, "higher_is_better": higher,
                         "native_top8": None if native.empty else float(native.iloc[0][metric]),
                         "pareto_front": front[["label", "mean_experts", metric]].to_dict("records")})
    problems = ([f"{len(damaged)} damaged line(s) of results.jsonl skipped (the next sweep into this folder "
                 f"sets them aside and redoes their runs): " + "; ".join(str(d) for d in damaged)] if damaged else [])
    problems += ([f"{len(excluded)} run(s) of another model, calibration or budget left out: "
                  + ", ".join(sorted({r['label'] for r in excluded}))] if excluded else [])
    problems += ([f"saved results missing for {len(missing)} run(s), so they are not in the paired tests "
                  f"(a resumed sweep recomputes them): " + ", ".join(missing)] if missing else [])
    summary = {"sweep": sweep.get("name"), "context": context, "versions": versions, "n_runs": len(runs),
               "n_failed": len(failed), "problems": problems, "headline": headline,
               "comparisons": comparison.to_dict("records")}
    write_json(folder / "analysis_summary.json", summary)

    lines = [f"# Routing report: {sweep.get('name', folder.name)}", "",
             f"Model `{context.get('model_id')}` ({context.get('dtype')}); calibration: "
             f"{(context.get('calibration') or {}).get('data', 'none')} "
             f"({(context.get('calibration') or {}).get('tokens', 0)} tokens). {len(ok)} runs ok, {len(failed)} failed.", "",
             "## Executive summary", ""]
    for h in headline:
        front = ", ".join(f"{escape(p['label'])} (k̄={p['mean_experts']:.2f}, {h['metric']}={p[h['metric']]:.4g})"
                          for p in h["pareto_front"])
        native = "–" if h["native_top8"] is None else f"{h['native_top8']:.4g}"
        lines.append(f"- **{h['task']}** ({h['metric']}, {'higher' if h['higher_is_better'] else 'lower'} is better): "
                     f"native top-8 {native}; Pareto-optimal configurations: {front}.")
    lines += [f"- **Note:** {escape(problem)}" for problem in problems]
    lines += ["", "Numbers come from this sweep only (items, max_length and seeds in the tables and in "
              "`results.jsonl`); small budgets give wide intervals — read the CIs.", "",
              "## Results", ""]
    for task in ok["task"].unique():
        frame = ok[ok["task"] == task]
        metrics = [c for c in ("word_perplexity", "token_perplexity", "bits_per_byte", "acc", "acc_norm", "perplexity")
                   if c in frame and frame[c].notna().any()]
        lines += [f"### {task} ({_budget(frame)})", "",
                  _markdown(frame, ["label", "mean_experts", "floor_rate", "ceiling_rate", *metrics, "tokens_per_s"]), ""]
    lines += ["## Paired tests against native top-8", "",
              "Perplexity ratio: paired bootstrap (2000 resamples) over items, candidate / native. Item-level test: "
              "paired t-test and Wilcoxon signed-rank on per-item values (log-likelihood for WikiText, acc_norm for "
              "HellaSwag, acc for LAMBADA); differences are candidate − native; d_z is Cohen's paired effect size.", "",
              _markdown(comparison, ["task", "label", "mean_experts", "ppl_ratio", "ppl_ratio_ci_low", "ppl_ratio_ci_high",
                                     "unit", "n", "mean_difference", "t_pvalue", "wilcoxon_pvalue", "cohens_dz"]), ""]
    if not prompts.empty:
        by = prompts.groupby(["label", "category"])["mean_experts"].mean().unstack()
        lines += ["## Prompt suite: mean experts per token by category", "",
                  _markdown(by.reset_index(), ["label", *by.columns]), ""]
    if not failed.empty:
        lines += ["## Failed runs", "", _markdown(failed, ["label", "task", "error"]), ""]
    lines += ["## Figures", ""] + [f"![{caption}]({name})\n\n{caption}\n" for name, caption in figures]
    lines += ["## Configuration and environment", "", "```json",
              json.dumps({"context": context, "versions": versions}, indent=1, default=str), "```", ""]
    write_atomic(folder / "REPORT.md", "\n".join(lines))
    return folder / "REPORT.md"
