# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Full routing experiments: quality vs compute
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bh-routing/bh_routing/blob/main/notebooks/03_OLMoE_Full_Routing_Experiments.ipynb)
#
# Part 3 of the [bh_routing](https://github.com/bh-routing/bh_routing) suite. The full-experiments preset: top-k, renormalised
# top-k and uniform-weight top-k at k ∈ {2, 4, 6, 8}; BH (α = 0.05) with max_k ∈ {2, 4, 6, 8, 16, 32,
# 64} and α ∈ {0.01, 0.10}; top-p, threshold, ratio and entropy routing — each evaluated, in patch
# mode, on held-out text of four domains (token perplexity per domain; the bundled tiny model's own
# training domains, where it is a language model), WikiText-2 (word perplexity), HellaSwag (acc,
# acc_norm) and LAMBADA (acc), the last three as lm-evaluation-harness defines them. Sections:
#
# 1. the plan and its cost
# 2. the sweep, checkpointed: a disconnect loses at most the run in progress
# 3. the report object and the comparison table → `REPORT.md`, `full_routing_results.csv`
# 4. quality-vs-mean-experts Pareto plots (descriptive)
# 5. paired comparisons against native top-8, BH-corrected over the report (`comparison.csv`)
# 6. **matched compute**: every adaptive strategy tuned to k̄ ∈ {2, 4, 6, 8} beside top-k at the
#    same k (optional; on by default when cheap)
# 7. findings: only what the corrected paired tests support; accuracy tasks at chance say so
# 8. the results folder: figures, tables, a zip
#
# **What it costs** (defaults; estimates). On a free Colab **T4** with `allenai/OLMoE-1B-7B-0924` in
# float16: ≈ 14 GiB of the T4's 15 GiB. The default `colab` budget (WikiText 8 articles, HellaSwag
# 300, LAMBADA 300, max_length 1024) scores ~117k tokens per configuration; 102 runs plus 20
# matched-compute runs are ~4.8 M tokens, **≈ 40 min at an assumed ~2k tokens/s**, on top of 5–10 min
# to download and load the model — one free session. The notebook re-estimates from the speed it
# measures on its first run. `BUDGET = "full"` (all 50 held-out WikiText articles, all 10,042
# HellaSwag and 5,153 LAMBADA items, 4096-token context) is ~138 M tokens, **≈ 19 h** at that rate:
# several sessions — set `DRIVE = True` so every finished run is on Google Drive and each session
# resumes where the last one stopped.

# %% tags=["parameters"]
# Parameters: edit, then Runtime -> Run all. Papermill injects its values in a cell after this one.
MODEL = "auto"   # "auto": OLMoE-1B-7B on a GPU, the bundled tiny OLMoE on CPU; "tiny", a hub id, a folder
BUDGET = "auto"  # "auto": "colab" on a GPU, "demo" on CPU; or "smoke" (seconds), "demo", "colab", "full"
OUT = "auto"     # results root shared by 01-03; "auto": Drive (DRIVE), /content (Colab), results/notebooks
DRIVE = False    # Colab: keep results *and* the Hugging Face model cache on Google Drive (survive reconnects)
SEED = 0
REPO_URL = "https://github.com/bh-routing/bh_routing"  # the install cell's source when nothing is uploaded
MATCHED = "auto"  # matched-compute section: True, False, or "auto" (on when it adds at most 35 % to the sweep)
TASKS = ("domains", "wikitext", "hellaswag", "lambada")  # domains: held-out text of the tiny model's training domains

# %% [markdown]
# ## Setup
#
# **Install** (skipped where `bh_routing` is importable, e.g. a checkout after `bash scripts/setup.sh`).
# In a fresh Colab the next cell installs the package with `pip`, which keeps Colab's torch: from a
# wheel (`bh_routing-*.whl`) or a zip of the repository (`bh_routing*.zip`) that you uploaded to the
# Files pane (`/content`) or — with `DRIVE = True` — put in `MyDrive`; otherwise from `REPO_URL`. If
# neither works it stops and says what to do. A wheel comes from `pip wheel --no-deps .` in a checkout.
#
# **Session**: the parameters resolve to a model, budget, device, dtype and the memory plan that sizes
# batches; without a GPU, `MODEL = "auto"` switches to the bundled tiny OLMoE and says so.
#
# *About the cost estimates above*: token counts are exact (the evaluator's own requests, OLMoE's
# tokenizer); times assume ~2,000 tokens/s for OLMoE-1B-7B in float16 on a T4 — not measured (derived
# from ~2.7 GFLOP per token against the T4's fp16 throughput, with a wide margin for small per-expert
# matrix products) — and memory comes from `bh_routing.models.memory_plan`.

# %%
# Install: an uploaded wheel/zip (/content or, with DRIVE, MyDrive) first, then REPO_URL
import glob, importlib, importlib.util, os, subprocess, sys
if importlib.util.find_spec("bh_routing") is None:  # pip keeps the runtime's torch (it meets torch>=2.1)
    if DRIVE and "google.colab" in sys.modules:
        from google.colab import drive
        drive.mount("/content/drive")
    uploads = [path for folder in (".", "/content/drive/MyDrive") for ext in ("whl", "zip")
               for path in sorted(glob.glob(f"{folder}/bh_routing*.{ext}"))]
    for source in uploads[:1] + [f"git+{REPO_URL}"]:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], capture_output=True,
                             text=True, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})  # never ask
        print(f"pip install {source}: " + ("done" if pip.returncode == 0 else pip.stderr[-400:]))
        if pip.returncode == 0:
            break
    else:
        raise RuntimeError(
            f"bh_routing is not installed and could not be installed from {REPO_URL}. Either set REPO_URL "
            "in the parameters cell to a repository that holds it, or upload bh_routing-<version>.whl "
            "(`pip wheel --no-deps .` in a checkout) or a zip of the repository (bh_routing*.zip) to the "
            "Files pane or to MyDrive (then set DRIVE = True), and run this cell again.")
    importlib.invalidate_caches()

# %%
from bh_routing import runtime
runtime.use_drive(DRIVE)  # before transformers is imported: HF_HOME on Drive

import numpy as np
import pandas as pd
import torch
from IPython.display import display

from bh_routing import analysis, plots
from bh_routing import session as sessions, bh_diagnostics as bhd, cost
from bh_routing import comparison, routing_plots as rplots, notebook_support as nbs
from bh_routing.models import describe_model, load_model

session = sessions.start_session("03", model=MODEL, budget=BUDGET, out=OUT, seed=SEED, drive=DRIVE)
FOLDER = session.folder
display(session)

# %%
model, tokenizer = load_model(session.model_id, dtype=session.dtype)  # prints the memory plan it checked
print(f"{type(model).__name__}: {model.config.num_hidden_layers} layers, {model.config.num_experts} experts, "
      f"top-{model.config.num_experts_per_tok}, {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters")
nbs.display_markdown(f"**Model:** {describe_model(session.model_id)}. Every number below is about this model.")
calibration, calibration_logits, how = sessions.load_or_calibrate(session, model, tokenizer, need_logits=True)
print("calibration:", how)

# %% [markdown]
# ## 1 · The plan and what it costs
#
# Tokens are counted exactly, by building every run's requests as the evaluator will; the time is that
# count divided by a throughput — the T4 assumption before anything ran, the measured speed after.

# %%
from bh_routing import experiments as ex, report
budget = session.budget
runs = ex.full_experiments(budget, TASKS)
main_estimate = cost.estimate_sweep(runs, tokenizer, default_max_length=4096)
search_tokens = sessions.MATCHED_SEARCH_TOKENS[session.budget_name]
matched_probe = cost.matched_runs_for_estimate(budget)  # what matched compute adds: 4 targets x 5 adaptive strategies, WikiText
matched_estimate = cost.estimate_sweep(matched_probe, tokenizer, default_max_length=4096)
share = matched_estimate["tokens"].sum() / main_estimate["tokens"].sum()
use_matched = share <= 0.35 if MATCHED == "auto" else bool(MATCHED)
on_t4 = "T4" in session.environment.get("gpu", "")
rate = cost.T4_TOKENS_PER_S
plan = pd.concat([main_estimate.assign(part="full preset"), matched_estimate.assign(part="matched compute")], ignore_index=True)
nbs.display_markdown(nbs.markdown_table(plan, ["part", "task", "runs", "tokens_per_run", "tokens", "seconds"], digits=3))
total = main_estimate["tokens"].sum() + (matched_estimate["tokens"].sum() if use_matched else 0)
nbs.display_markdown(
    f"{len(runs)} runs of the full preset" + (f" + {len(matched_probe)} matched-compute runs" if use_matched else "") +
    f": **{total / 1e6:.2f} M tokens**. At the assumed T4 rate of {rate:,.0f} tokens/s that is "
    f"**{cost.format_duration(total / rate)}**{'' if on_t4 else ' on a T4 (this machine differs; the measured estimate follows the first run)'}. "
    f"Matched compute adds {share:.0%} → {'on' if use_matched else 'off'} (MATCHED = {MATCHED!r}).")

# %%
if use_matched:  # the knob (α, p, τ, β) that gives each target mean k on calibration text, found by bisection
    search_logits = [l.to(session.device) for l in bhd.subsample(calibration_logits, search_tokens, session.seed)]
    matched_runs = comparison.new_runs(runs, ex.matched_compute(budget, search_logits, calibration, tasks=("wikitext",)))
    knobs = pd.DataFrame([{"label": r.label, "target k̄": r.routing["calibrated"]["target_k"],
                           "achieved on calibration": r.routing["calibrated"]["achieved_k"],
                           r.routing["calibrated"]["knob"]: r.routing[r.routing["calibrated"]["knob"]]}
                          for r in matched_runs if "calibrated" in r.routing])
    nbs.display_markdown(nbs.markdown_table(knobs, digits=4))
else:
    matched_runs = []
all_runs = runs + matched_runs

# %% [markdown]
# ## 2 · The sweep (checkpointed — re-run to resume)
#
# Every finished run is appended to `results.jsonl` in the results folder at once; a run that fails
# (out of memory, NaN) is recorded with its error and the sweep goes on. After a disconnect, run the
# notebook again with the same parameters: finished runs are skipped. A representative mix of runs
# (every task, several strategies) runs first, and the rest is estimated from the speed of that mix.

# %%
context = ex.SweepContext(model, tokenizer, session.model_id, calibration)
mix = cost.representative_runs(all_runs)  # every task, several strategies: the cheapest run alone under-estimates
timed = ex.run_sweep(context, mix, FOLDER, name="full")
measured = cost.measured_rate(timed, cost.estimate_sweep(mix, tokenizer, default_max_length=4096))
if measured:
    remaining = cost.estimate_sweep([r for r in all_runs if r not in mix], tokenizer, tokens_per_s=measured, default_max_length=4096)
    print(f"measured {measured:,.0f} tokens/s over a mix of {len(mix)} runs -> about "
          f"{cost.format_duration(remaining['seconds'].sum())} for the remaining runs (finished runs are skipped)")
records = ex.run_sweep(context, all_runs, FOLDER, name="full")
failed = [r for r in records if r["status"] != "ok"]
print(f"{len(records) - len(failed)} runs ok, {len(failed)} failed" + "".join(f"\n  {r['label']} ({r['task']}): {r['error']}" for r in failed))

# %% [markdown]
# ## 3 · The report and the comparison table
#
# `report.build_report` reads the sweep into one report object — runs, paired comparisons, findings,
# figures — and `write` saves its tables, figures and `REPORT.md` in the results folder. Below, one row
# per configuration: mean experts per token and layer (mean over the tasks; per task in the CSV), each
# task's headline metric, and how often the count sits on its floor (min_k) or ceiling (max_k).

# %%
sweep_report = report.build_report(FOLDER)
sweep_report.write(FOLDER)
table = sweep_report.runs
comparison_table = comparison.comparison_table(table[table["target_k"].isna()])
comparison_table.to_csv(FOLDER / "full_routing_results.csv", index=False)
nbs.display_markdown(nbs.markdown_table(comparison_table, ["label", "strategy", "group", "mean_experts", *comparison.HEADLINE_COLUMNS,
                                                           "floor_rate", "ceiling_rate"], digits=4))

# %% [markdown]
# ## 4 · Quality vs mean experts (descriptive)
#
# The report's Pareto plots: point estimates; the staircase joins the configurations no other beats on
# both axes. They describe this sample; which differences are real is for sections 5 and 7 to say.
# Tasks at chance on this model get no plot.

# %%
for figure in sweep_report.figures:
    if figure.name.startswith("pareto_"):
        sessions.show(figure.figure)
        session.figures.append((f"{figure.name}.png", figure.caption))  # saved by sweep_report.write

# %% [markdown]
# ## 5 · Paired comparisons
#
# Same items, same tokens: each configuration against native top-8 (and a compute-matched one also
# against top-k at its k̄), by a paired test over items — paired t on per-item log-likelihoods
# (WikiText articles, domain documents), exact McNemar on per-item correctness (HellaSwag, LAMBADA) —
# with Benjamini–Hochberg correction over every comparison of the report. Effects are candidate −
# reference with 95 % CIs. From the report's `comparison.csv`.

# %%
nbs.display_markdown(report.markdown_table(sweep_report.comparisons, ["task", "candidate", "reference", "candidate_k", "reference_k",
                                                                     "n", "test", "effect", "ci_low", "ci_high", "p_adjusted", "verdict"]))

# %% [markdown]
# ## 6 · Matched compute
#
# The fair comparison: each adaptive strategy at the knob that gives a target mean number of experts
# k̄ on calibration text, beside top-k with k = k̄, on WikiText. A claim needs the k̄ achieved on the
# evaluated text to match within the report's tolerance; the table and the figure are descriptive.

# %%
matched = comparison.matched_table(table) if use_matched else pd.DataFrame()
if len(matched):
    matched.to_csv(FOLDER / "matched_compute.csv", index=False)
    nbs.display_markdown(nbs.markdown_table(matched, digits=4))
    session.figure(rplots.plot_matched_compute(matched, subtitle=session.subtitle), "matched_compute",
                   "Matched compute: each strategy at k̄ = 2, 4, 6, 8 beside top-k (descriptive).")
    nbs.display_markdown([f.statement for f in sweep_report.findings if f.comparison.matched])
else:
    print("matched compute is off (MATCHED = False, or too expensive at this budget with MATCHED = 'auto')")

# %% [markdown]
# ## 7 · Findings (paired tests, corrected for the number of comparisons)

# %%
nbs.display_markdown(sweep_report.findings_markdown())

# %% [markdown]
# ## Next steps
#
# - Larger budget: `BUDGET = "full"` with `DRIVE = True` resumes across sessions (finished runs are
#   kept on Drive; re-run with the same parameters).
# - Your own grid: the CLI runs any strategy list (`python -m bh_routing sweep --help`), and
#   `bh_routing.report.build_report(folder)` rebuilds this report from any sweep folder.
# - Back to **[02](02_OLMoE_BenjaminiHochberg_Routing.ipynb)** for why each p-value model behaves as it does,
#   or **[01](01_OLMoE_Baseline.ipynb)** for the native router.

# %% [markdown]
# ## Results folder
#
# Everything above is in the results folder: JSON, CSV, every figure as PNG and a Markdown report.
# The cell zips it and, on Colab, downloads the zip (elsewhere it says where the zip is).
#
# `REPORT.md` is the sweep report (findings, every run, the paired comparisons, figures, the
# configuration and versions); `runs.csv` has one row per run, `full_routing_results.csv` one per
# configuration. The per-run token arrays (`runs/`) stay in the folder for resuming, not in the zip.

# %%
nbs.write_json(FOLDER / "notebook_summary.json", {"session": session.describe(), "calibration": {"how": how, **calibration.metadata},
                                                   "matched_compute": use_matched, "report": sweep_report.summary(),
                                                   "failed_runs": len(failed), "seconds": round(session.elapsed, 1)})
archive = nbs.zip_folder(FOLDER)
print(f"{len(list(FOLDER.glob('*.png')))} figures -> {archive}")
print(f"notebook 03 took {session.elapsed:.0f} s")

# %%
print(nbs.offer_download(archive))  # a browser download on Colab; skipped elsewhere
