"""A sweep folder → one :class:`Report`: runs, paired comparisons, findings, figures, Markdown.

:func:`build_report` only *reads* the folder; :meth:`Report.write` writes the report's files (into
the sweep folder or anywhere else); a notebook displays the object itself (``_repr_markdown_``).

What a report concludes comes from :mod:`bh_routing.findings`: every run is compared with native
top-8 on the same items (and a compute-matched run with top-k at its target k̄), each comparison by
a paired test over items of its task's outcome (`evaluation.TASKS[task].outcome`), Benjamini–Hochberg
over all the comparisons of the report. Accuracy tasks whose native top-8 is within its CI of chance
give "at chance on this model: no conclusion". Pareto frontiers are descriptive (point estimates).

Files written by :meth:`Report.write`:
  runs.csv               one row per run: config knobs, mean experts, floor/ceiling, quality
  comparison.csv         one row per comparison: test, effect, CI, n, p, BH-adjusted p, verdict
  domains.csv            the domains task: token perplexity and mean experts per domain and run
  experts_per_layer.csv  mean experts per token per layer and run
  prompts.csv            prompt-suite runs: one row per prompt and configuration
  prompt_stats.csv       prompt-suite runs: experts per token and expert load per configuration
  analysis_summary.json  context, chance checks and findings
  *.png, REPORT.md       figures and the report that embeds them

A sweep folder's ``latency.json`` (``prompts.time_routings``: warmed up, repeated, interleaved) is
the only timing a report shows; the tokens/s each run records once are not.

Read-only on the results: ``results.jsonl`` is never written (damaged lines are skipped and named;
the next sweep sets them aside), only the records of the folder's context are reported (any others,
in a folder from before contexts were stored, are counted and named), and runs whose saved results
are missing are left out of the tests and named (a resumed sweep recomputes them).
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from . import findings as fd
from . import plots
from .evaluation import TASKS
from .models import describe_model
from .folder import PER_TASK_KEYS, read_context
from .markdown import escape, markdown_table
from .prompts import (PROMPT_STATS_COLUMNS, latency_table, load_cv_per_layer, prompt_stats_table, prompts_table,
                      read_latency)
from .report_tables import (FIXED_K_STRATEGIES, NATIVE_K, SavedResults, comparisons_and_chance, domain_allocation,
                            domains_table, items_and_length, runs_table)
from .store import latest_by_run, read_results, write_atomic, write_json

TIMING_NOTE = ("Throughput is not shown from the runs: a sweep times each run once, without warm-up, while other "
               "runs and processes share the machine, so their tokens/s are not comparable across configurations. "
               "Only an interleaved timing (latency.json, written after a prompt sweep) is shown.")


# --------------------------------------------------------------------------- figures


@dataclass
class Figure:
    name: str       # file name without .png
    caption: str
    figure: Any     # matplotlib Figure


def _sweeps_of(frame: pd.DataFrame, knob: str, fixed: tuple[str, ...]) -> pd.DataFrame:
    """BH runs that vary ``knob`` with the ``fixed`` knobs held equal (at least two values of it)."""
    bh = frame[frame["strategy"].isin(["bh", "by"]) & frame["target_k"].isna()]
    keys = [c for c in fixed if c in bh]
    if bh.empty or knob not in bh:
        return bh
    sizes = bh.groupby(keys, dropna=False)[knob].transform("nunique") if keys else bh[knob].nunique()
    return bh[sizes >= 2]


def make_figures(runs: pd.DataFrame, prompts: pd.DataFrame, domains: pd.DataFrame, subtitle: str,
                 at_chance: Sequence[str] = (), load_cv: pd.DataFrame | None = None,
                 latency: dict | None = None) -> list[Figure]:
    """The report's figures; no Pareto plot for a task at chance (its frontier would be noise).
    ``load_cv``: :func:`load_cv_per_layer`; ``latency``: the folder's interleaved timing (the only
    timing drawn)."""
    ok = runs[runs["status"] == "ok"]
    made: list[Figure] = []
    for task, spec in TASKS.items():
        if task in at_chance:
            continue
        metric = spec.headline
        frame = ok[ok["task"] == task].dropna(subset=["mean_experts"])
        if metric.name in frame and frame[metric.name].notna().sum() >= 2:
            values = frame[metric.name].dropna().to_numpy(float)
            log = bool(values.min() > 0 and values.max() / values.min() > 10)   # values spanning decades
            made.append(Figure(f"pareto_{task}", f"{task}: {metric.name} vs mean active experts; the staircase is "
                                                 "the descriptive Pareto frontier of the point estimates (not a test).",
                               plots.plot_pareto(frame, quality=metric.name, higher_is_better=metric.higher_is_better,
                                                 dataset=None, logy=log, subtitle=f"{subtitle} · {items_and_length(frame)}",
                                                 title=f"{task}: {metric.name} vs mean active experts (descriptive)")))
    tasks = [t for t in TASKS if t in set(ok["task"])]
    first = ok[ok["task"] == tasks[0]] if tasks else ok.iloc[:0]
    if len(first) >= 2:
        made.append(Figure("experts_by_config", "Mean active experts per token and layer by configuration.",
                           plots.plot_experts_by_config(first, subtitle=f"{subtitle} · {first['task'].iloc[0]}, "
                                                                        f"{items_and_length(first)}")))
    first_task = first[first["task"] == first["task"].iloc[0]] if len(first) else first
    alpha = _sweeps_of(first_task, "alpha", ("pvalues", "temperature", "max_k", "min_k"))
    if len(alpha) >= 2:
        made.append(Figure("alpha_sensitivity", "BH: α vs mean experts and floor rate, per p-value model.",
                           plots.plot_alpha_sensitivity(alpha, metrics=("mean_experts", "floor_rate"), subtitle=subtitle)))
    temperature = _sweeps_of(first_task, "temperature", ("pvalues", "alpha", "max_k", "min_k"))
    if len(temperature) >= 2:   # only softmax p-values take a temperature (calibrated ones refuse T != 1)
        made.append(Figure("temperature_sensitivity", "BH on softmax p-values: temperature vs the share of "
                                                      "tokens BH leaves on the floor.",
                           plots.plot_temperature_sensitivity(temperature, metrics=("floor_rate",), subtitle=subtitle)))
    weights = _sweeps_of(first_task, "weights_temperature", ("pvalues", "alpha", "temperature", "max_k", "min_k"))
    if len(weights) >= 2:
        quality = [m.name for m in TASKS[first_task["task"].iloc[0]].metrics
                   if m.name in weights and weights[m.name].notna().any()][:1] if first_task["task"].iloc[0] in TASKS else []
        made.append(Figure("weights_temperature", "BH: mixing-weights temperature at a fixed selection vs quality.",
                           plots.plot_temperature_sensitivity(weights, metrics=quality or ("mean_experts",),
                                                              x="weights_temperature", hue=None, subtitle=subtitle)))
    grid = _sweeps_of(first_task, "max_k", ("pvalues", "temperature", "min_k"))
    if grid["max_k"].nunique() >= 2 and grid["alpha"].nunique() >= 2:
        made.append(Figure("alpha_maxk_heatmap", "BH: mean experts over α × max_k.",
                           plots.plot_alpha_maxk_heatmap(grid, subtitle=subtitle)))
    adaptive = domains[~domains["strategy"].isin(FIXED_K_STRATEGIES)] if "mean_experts" in domains else domains.iloc[:0]
    if not adaptive.empty:
        made.append(Figure("experts_by_domain", "Domains task: mean experts per token by held-out domain, for the "
                                                "configurations whose count adapts (top-k's is fixed by construction).",
                           plots.plot_grouped_bars(adaptive, x="label", y="mean_experts", hue="domain",
                                                   title="Mean active experts per token by held-out domain",
                                                   xlabel="configuration", ylabel="mean experts per token",
                                                   subtitle=subtitle)))
    if not prompts.empty:
        made.append(Figure("experts_by_category", "Prompt suite: mean experts per token by prompt category.",
                           plots.plot_experts_by_category(prompts, value="mean_experts", subtitle=subtitle)))
    counted = ok.dropna(subset=["mean_experts"])
    if len(counted) >= 2:
        made.append(Figure("reduction", f"Experts saved vs native top-{NATIVE_K}: 100 · (1 − mean experts / "
                                        f"{NATIVE_K}) per configuration, one bar per task (negative: more experts "
                                        "than native).",
                           plots.plot_reduction(counted, native_k=NATIVE_K, group="task", subtitle=subtitle)))
    if load_cv is not None and not load_cv.empty:
        made.append(Figure("load_cv", "Prompt suite: expert-load CV (std / mean of the experts' assignment counts) "
                                      "per layer and configuration, over the teacher-forced prompt tokens "
                                      "(0 = every expert equally used).",
                           plots.plot_load_cv(load_cv, subtitle=f"{subtitle} · prompt suite")))
    if latency:
        frame = latency_table(latency)
        made.append(Figure("experts_vs_latency",
                           f"Mean experts per token vs median ms per generated token, from latency.json: "
                           f"{latency['method']} ({latency['device']}, {latency['machine'].get('torch_threads')} "
                           "torch threads). The sweep's single-pass timings are not drawn.",
                           plots.plot_experts_vs_latency(frame, y="ms_per_token",
                                                         subtitle=f"{subtitle} · {latency['device']}")))
    return made


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    """Everything a sweep's report says, as data; ``to_markdown()`` renders it, ``write()`` saves it."""
    title: str
    context: dict
    versions: dict
    runs: pd.DataFrame
    findings: list[fd.Finding]
    chance: list[fd.ChanceCheck]
    domains: pd.DataFrame = field(default_factory=pd.DataFrame)
    domain_allocation: pd.DataFrame = field(default_factory=pd.DataFrame)
    prompts: pd.DataFrame = field(default_factory=pd.DataFrame)
    prompt_stats: pd.DataFrame = field(default_factory=pd.DataFrame)
    latency: dict | None = None      # the folder's interleaved timing (latency.json)
    per_layer: pd.DataFrame = field(default_factory=pd.DataFrame)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # e.g. why a task has no paired tests
    alpha: float = fd.ALPHA

    @property
    def model(self) -> str:
        return describe_model(self.context.get("model_id"))

    @property
    def comparisons(self) -> pd.DataFrame:
        return pd.DataFrame([f.as_row() for f in self.findings])

    @property
    def ok(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == "ok"]

    @property
    def failed(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == "failed"]

    def findings_markdown(self, with_model: bool = True) -> str:
        """The conclusions: chance checks, the statistically supported findings, what was not detected."""
        lines = [f"Model: {self.model}.", ""] if with_model else []
        lines += [f"- {check.statement}" for check in self.chance]
        lines += [f"- {html.escape(note)}" for note in self.notes]
        supported = [f for f in self.findings if f.is_finding]
        tested = [f for f in self.findings if f.family_size]
        family = tested[0].family_size if tested else 0
        lines += [f"- {html.escape(f.statement)}" for f in supported]
        if tested and not supported:
            lines.append(f"- No configuration differs from its reference after Benjamini–Hochberg correction over "
                         f"the {family} comparisons of this report (FDR {self.alpha:g}).")
        for task, group in pd.DataFrame([f.as_row() for f in tested]).groupby("task", sort=False) if tested else ():
            quiet = group[group["verdict"] == "no difference detected"]
            if len(quiet):
                needed = quiet["n_needed"].dropna()
                lines.append(f"- {task}: no difference detected for {len(quiet)} of {len(group)} comparisons at "
                             f"n = {int(group['n'].max())} {group['unit'].iloc[0]}s"
                             + (f" (detecting their observed effects would need n ≈ {int(needed.min()):,}–"
                                f"{int(needed.max()):,})" if len(needed) else "") + ".")
        unmatched = [f for f in self.findings if f.verdict == "not matched"]
        if unmatched:
            lines.append(f"- {len(unmatched)} compute-matched runs used more experts than their top-k reference "
                         f"(beyond ±{fd.K_TOLERANCE:g}): no matched-compute conclusion from them.")
        if len(self.domain_allocation):
            for row in self.domain_allocation.itertuples():
                means = ", ".join(f"{name} {value:.2f}" for name, value in
                                  sorted(row.means.items(), key=lambda item: item[1]))
                verdict = "gives the domains different numbers of experts" if row.differs else \
                    "no difference in experts across domains detected"
                lines.append(f"- domains: **{escape(row.label)}**: {verdict} (mean experts per document: {means}; "
                             f"{row.test}, n = {row.n} documents, BH-adjusted p = {row.p_adjusted:.3g} over "
                             f"{len(self.domain_allocation)} runs).")
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        ok, failed = self.ok, self.failed
        calibration = self.context.get("calibration") or {}
        out = [f"# {self.title}", "",
               f"Model: {self.model} ({self.context.get('dtype')}); calibration: {calibration.get('data', 'none')} "
               f"({calibration.get('tokens', 0)} tokens). {len(ok)} runs ok, {len(failed)} failed. Scores are "
               "computed with a float32 log-softmax whatever the model's dtype (lm-eval's default uses the "
               "model's dtype; `softmax_dtype=None` reproduces it).", "",
               "## Findings", "",
               "A finding is stated only when a paired test over items (paired t on per-item log-likelihoods; "
               "exact McNemar on per-item correctness) rejects after Benjamini–Hochberg correction over every "
               f"comparison in this report (FDR {self.alpha:g}); effects are candidate − reference with 95 % CIs. "
               f"Compute-matched claims need |Δk̄| ≤ {fd.K_TOLERANCE:g}.", "",
               self.findings_markdown(with_model=False), "## Results", ""]
        for task in ok["task"].unique():
            frame = ok[ok["task"] == task]
            metrics = [m.name for m in TASKS[task].metrics if m.name in frame] if task in TASKS else []
            out += [f"### {task} ({items_and_length(frame)})", "",
                    markdown_table(frame, ["label", "mean_experts", "floor_rate", "ceiling_rate", *metrics], digits=3), ""]
            at_chance = any(c.task == task and c.at_chance for c in self.chance)
            if task in TASKS and TASKS[task].headline.name in frame and len(frame) >= 2 and not at_chance:
                out += [self._pareto_line(task, frame), ""]
        if not self.domains.empty:
            out += ["## Domains: per held-out domain", "",
                    markdown_table(self.domains, ["label", "domain", "documents", "tokens", "token_perplexity",
                                                  "mean_experts"], digits=3), ""]
        columns = ["task", "candidate", "reference", "candidate_k", "reference_k", "unit", "n", "test", "effect",
                   "ci_low", "ci_high", "p_adjusted", "verdict"]
        out += ["## Paired comparisons", "", markdown_table(self.comparisons, columns, digits=3), "", TIMING_NOTE, ""]
        if self.latency:
            out += ["## Latency (interleaved timing)", "",
                    f"From latency.json: {self.latency['method']}. Device {self.latency['device']} "
                    f"({self.latency['dtype']}), {self.latency['machine'].get('torch_threads')} torch threads, "
                    f"{self.latency['machine'].get('processor')}, {self.latency['machine'].get('platform')}.", "",
                    markdown_table(latency_table(self.latency), digits=3), ""]
        if not self.prompt_stats.empty:
            first = self.prompt_stats.iloc[0]
            out += ["## Prompt suite: experts per token and expert load", "",
                    f"Over the teacher-forced tokens of the prompts (n = {int(first['n_prompts'])} prompts, "
                    f"{int(first['n_tokens'])} tokens per configuration: the same tokens under every routing). "
                    "Experts per token: each token's count averaged over the layers; mean, std, min and max over "
                    "the tokens, and the range of the per-layer means. Expert load: per layer, the assignment "
                    "counts of the experts, their CV (std / mean) and max/min ratio averaged over the layers "
                    "(max/min is inf when an expert got no token; `dead_experts` counts those over all layers). "
                    "Floor/ceiling: share of (layer, token) counts at min_k / max_k.", "",
                    markdown_table(self.prompt_stats, ["label", *PROMPT_STATS_COLUMNS[1:]], digits=3), ""]
        if not self.prompts.empty:
            by = self.prompts.groupby(["label", "category"])["mean_experts"].mean().unstack()
            out += ["## Prompt suite: mean experts per token by category", "",
                    markdown_table(by.reset_index(), ["label", *by.columns], digits=3), ""]
        if not failed.empty:
            out += ["## Failed runs", "", markdown_table(failed, ["label", "task", "error"], digits=3), ""]
        out += ["## Figures", ""] + [f"![{f.caption}]({f.name}.png)\n\n{f.caption}\n" for f in self.figures]
        out += ["## Configuration and environment", "", "```json",
                json.dumps({"context": self.context, "versions": self.versions}, indent=1, default=str), "```", ""]
        return "\n".join(out)

    def _pareto_line(self, task: str, frame: pd.DataFrame) -> str:
        metric = TASKS[task].headline
        frame = frame.dropna(subset=["mean_experts", metric.name])
        front = frame.iloc[plots.pareto_front(frame[["mean_experts", metric.name]].to_numpy(float),
                                              metric.higher_is_better)]
        points = ", ".join(f"{escape(r['label'])} (k̄ = {r['mean_experts']:.2f}, {r[metric.name]:.4g})"
                           for _, r in front.iterrows())
        return f"Descriptive Pareto frontier of the point estimates ({metric.name}; not a finding): {points}."

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def summary(self) -> dict:
        return {"title": self.title, "model": self.model, "context": self.context, "versions": self.versions,
                "n_runs": len(self.runs), "n_failed": len(self.failed), "alpha": self.alpha,
                "chance": [vars(c) | {"at_chance": c.at_chance} for c in self.chance],
                "findings": [f.statement for f in self.findings if f.is_finding],
                "comparisons": self.comparisons.to_dict("records")}

    def write(self, folder: str | Path) -> Path:
        """Tables, figures, analysis_summary.json and REPORT.md into ``folder``; returns REPORT.md."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.runs.to_csv(folder / "runs.csv", index=False)
        self.comparisons.to_csv(folder / "comparison.csv", index=False)
        self.per_layer.to_csv(folder / "experts_per_layer.csv", index=False)
        if not self.domains.empty:
            self.domains.to_csv(folder / "domains.csv", index=False)
        if not self.prompts.empty:
            self.prompts.drop(columns=["continuation", "text"], errors="ignore").to_csv(folder / "prompts.csv", index=False)
        if not self.prompt_stats.empty:
            self.prompt_stats.to_csv(folder / "prompt_stats.csv", index=False)
        for figure in self.figures:
            plots.save(figure.figure, folder / f"{figure.name}.png")
        write_json(folder / "analysis_summary.json", self.summary())
        write_atomic(folder / "REPORT.md", self.to_markdown())
        return folder / "REPORT.md"


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


def build_report(folder: str | Path, alpha: float = fd.ALPHA, k_tolerance: float = fd.K_TOLERANCE) -> Report:
    """Read a sweep folder (results.jsonl, context.json, sweep.json, runs/) into a :class:`Report`;
    writes nothing."""
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
    load = SavedResults(folder)
    saved = (runs["status"] == "ok") & runs["task"].isin(TASKS)       # runs whose EvalResult was saved
    lost = {run_id for run_id in runs.loc[saved, "run_id"] if not load.available(run_id)}
    usable = runs[~runs["run_id"].isin(lost)]
    comparisons, chance, notes = comparisons_and_chance(usable, load)
    notes += ([f"{len(damaged)} damaged line(s) of results.jsonl skipped (the next sweep into this folder "
               f"sets them aside and redoes their runs): " + "; ".join(str(d) for d in damaged)] if damaged else [])
    notes += ([f"{len(excluded)} run(s) of another model, calibration or budget left out: "
               + ", ".join(sorted({r['label'] for r in excluded}))] if excluded else [])
    notes += ([f"saved results missing for {len(load.missing)} run(s), so they are not in the paired tests "
               f"(a resumed sweep recomputes them): " + ", ".join(load.missing)] if load.missing else [])
    at_chance = [c.task for c in chance if c.at_chance]
    found = fd.assess(comparisons, alpha=alpha, k_tolerance=k_tolerance, at_chance=at_chance)
    domains = domains_table(usable, load)
    prompts = prompts_table(records)
    latency, latency_note = read_latency(folder, context)
    notes += [latency_note] if latency_note else []
    per_layer = pd.DataFrame([{"label": r["label"], "task": r["task"], "layer": layer, "mean_experts": k}
                              for r in records if r["status"] == "ok"
                              for layer, k in enumerate((r.get("experts") or {}).get("mean_experts_per_layer", []))])
    subtitle = f"{describe_model(context.get('model_id'))} · {str(context.get('dtype', '')).replace('torch.', '')}"
    return Report(title=f"Routing report: {sweep.get('name', folder.name)}", context=context,
                  versions=next((r.get("versions") for r in records if r.get("versions")), {}), runs=runs,
                  findings=found, chance=chance, domains=domains,
                  domain_allocation=domain_allocation(usable, load, alpha),
                  prompts=prompts, prompt_stats=prompt_stats_table(records), latency=latency, per_layer=per_layer,
                  alpha=alpha, notes=notes,
                  figures=make_figures(usable, prompts, domains, subtitle, at_chance, load_cv_per_layer(records),
                                       latency))
