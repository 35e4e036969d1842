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
MODEL = "auto"   # "auto": OLMoE-1B-7B on GPU, bundled tiny OLMoE on CPU; "tiny", hub id, folder
BUDGET = "auto"  # "auto": "colab" on GPU, "demo" on CPU; "smoke" (seconds), "demo", "colab", "full"
OUT = "auto"     # results root of 01-03; "auto": Drive (DRIVE), /content (Colab), results/notebooks
DRIVE = False    # Colab: results *and* the Hugging Face cache on Google Drive (survive reconnects)
SEED = 0
REPO_URL = "https://github.com/bh-routing/bh_routing"  # the install source when nothing is uploaded
MATCHED = "auto"  # matched compute: True, False, "auto" (on when it adds at most 35 % to the sweep)
TASKS = ("domains", "wikitext", "hellaswag", "lambada")  # domains: held-out text of 4 domains
STRATEGIES = ("top-k", "normalized", "uniform", "adaptive",  # strategy families of the sweep
              "bh max_k", "bh alpha", "other adaptive")
KS = (2, 4, 6, 8)          # top-k, normalised, uniform and BH max_k at each k
MAX_KS = (16, 32, 64)      # BH α=0.05 beyond the native 8
ALPHAS = (0.01, 0.10)      # BH max_k=8 beside α=0.05
MATCHED_KS = (2, 4, 6, 8)  # matched compute: target mean experts

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
# Install bh_routing if missing: an uploaded wheel/zip (also MyDrive with DRIVE), else REPO_URL
import glob, importlib.util, os, subprocess, sys
if importlib.util.find_spec("bh_routing") is None:  # pip keeps the runtime's torch (torch>=2.1)
    if DRIVE and "google.colab" in sys.modules:
        from google.colab import drive
        drive.mount("/content/drive")
    uploads = [path for folder in (".", "/content/drive/MyDrive") for ext in ("whl", "zip")
               for path in sorted(glob.glob(f"{folder}/bh_routing*.{ext}"))]
    for source in uploads[:1] + [f"git+{REPO_URL}"]:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], text=True,
                             capture_output=True, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        print(f"pip install {source}:", pip.stderr[-400:] if pip.returncode else "done")
        if pip.returncode == 0:
            break
    else:
        raise RuntimeError(
            f"bh_routing is not installed and could not be installed from {REPO_URL}. Either "
            "set REPO_URL in the parameters cell to a repository that holds it, or upload "
            "bh_routing-<version>.whl (`pip wheel --no-deps .` in a checkout) or a zip of the "
            "repository (bh_routing*.zip) to the Files pane or to MyDrive (then set "
            "DRIVE = True), and run this cell again.")
    importlib.invalidate_caches()

# %%
from bh_routing import runtime
runtime.use_drive(DRIVE)  # before transformers is imported: HF_HOME on Drive
from IPython.display import display
from bh_routing import comparison, cost, experiments as ex, report, session as sessions

session = sessions.start_session("03", model=MODEL, budget=BUDGET, out=OUT, seed=SEED, drive=DRIVE)
display(session)

# %%
model, tokenizer = session.load_model()  # prints the memory plan it checked
calibration, calibration_logits, _ = sessions.load_or_calibrate(session, model, tokenizer,
                                                                need_logits=True)

# %% [markdown]
# ## 1 · The plan and what it costs
#
# Tokens are counted exactly, by building every run's requests as the evaluator will; the time is that
# count divided by a throughput — the T4 assumption before anything ran, the measured speed after.

# %%
runs = ex.full_experiments(session.budget, TASKS, ks=KS, max_ks=MAX_KS, alphas=ALPHAS,
                           strategies=STRATEGIES)
matched_probe = cost.matched_runs_for_estimate(session.budget, targets=MATCHED_KS)
plan, use_matched, plan_text = cost.plan_sweep(runs, matched_probe, tokenizer, MATCHED,
                                               on_t4="T4" in session.environment.get("gpu", ""))
session.table(plan, "Plan", ["part", "task", "runs", "tokens_per_run", "tokens", "seconds"])
session.say(plan_text)

# %%
if use_matched:  # the knob (α, p, τ, β) giving each target mean k on calibration text
    runs += comparison.show_matched_runs(session, runs, calibration, calibration_logits, MATCHED_KS)

# %% [markdown]
# ## 2 · The sweep (checkpointed — re-run to resume)
#
# Every finished run is appended to `results.jsonl` in the results folder at once; a run that fails
# (out of memory, NaN) is recorded with its error and the sweep goes on. After a disconnect, run the
# notebook again with the same parameters: finished runs are skipped. A representative mix of runs
# (every task, several strategies) runs first, and the rest is estimated from the speed of that mix.

# %%
context = ex.SweepContext(model, tokenizer, session.model_id, calibration)
mix = cost.representative_runs(runs)  # every task, several strategies: one run under-estimates
timed = ex.run_sweep(context, mix, session.folder, name="full")
print(cost.describe_remaining(timed, mix, runs, tokenizer))
ex.run_sweep(context, runs, session.folder, name="full")

# %% [markdown]
# ## 3 · The report
#
# `report.build_report` reads the sweep into one report object and shows it below: the findings —
# stated only where a paired test over items (paired t on per-item log-likelihoods for WikiText
# articles and domain documents; exact McNemar on per-item correctness for HellaSwag and LAMBADA)
# rejects after Benjamini–Hochberg correction over every comparison of the report — each task's
# runs, the paired comparisons against native top-8 (and, for a compute-matched run, top-k at its
# k̄) with 95 % CIs, and any failed run. `write` saves its tables, figures and `REPORT.md`.

# %%
sweep_report = report.build_report(session.folder)
sweep_report.write(session.folder)  # runs.csv, comparison.csv, figures, REPORT.md and the JSON
display(sweep_report)

# %% [markdown]
# ## 4 · Quality vs mean experts (descriptive)
#
# The report's Pareto plots: point estimates; the staircase joins the configurations no other beats on
# both axes. They describe this sample; which differences are real is for the report's paired tests to say.
# Tasks at chance on this model get no plot.

# %%
for figure in sweep_report.figures:
    if figure.name.startswith("pareto_"):
        sessions.show(figure.figure)  # saved by sweep_report.write

# %% [markdown]
# ## 5 · One row per configuration
#
# Mean experts per token and layer (mean over the tasks; per task in the CSV), each task's headline
# metric, and how often the count sits on its floor (min_k) or ceiling (max_k).

# %%
columns = ["label", "strategy", "group", "mean_experts", *comparison.HEADLINE_COLUMNS, "floor_rate",
           "ceiling_rate"]
session.table(comparison.comparison_table(sweep_report.ok[sweep_report.ok["target_k"].isna()]),
              "One row per configuration", columns, csv="full_routing_results")

# %% [markdown]
# ## 6 · Matched compute
#
# The fair comparison: each adaptive strategy at the knob that gives a target mean number of experts
# k̄ on calibration text, beside top-k with k = k̄, on WikiText. A claim needs the k̄ achieved on the
# evaluated text to match within the report's tolerance; the table and the figure are descriptive.

# %%
matched = comparison.show_matched(session, sweep_report) if use_matched else None

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
session.finish()  # REPORT.md is the sweep report written above
