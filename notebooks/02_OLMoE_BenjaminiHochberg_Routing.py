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
# # 02 · Benjamini–Hochberg routing in OLMoE: a deep dive
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bh-routing/bh_routing/blob/main/notebooks/02_OLMoE_BenjaminiHochberg_Routing.ipynb)
#
# Part 2 of the [bh_routing](https://github.com/bh-routing/bh_routing) suite. Instead of a fixed top-8, **BH routing** lets each
# token use as many experts as a false-discovery-rate test on the router's scores says it needs: for
# p-values p₁…p₆₄, sort them, find the largest k with p₍ₖ₎ ≤ (k/64)·α, select those k (clamped to
# [min_k, max_k]). Everything hinges on the p-values. Sections:
#
# 1. BH explained on one real token: sorted p-values against the (k/N)·α line
# 2. why naive p-values fail, on the model's own logits; the calibration's held-out quality per layer
#    and expert
# 3. the four p-value models compared: α ↦ experts, per layer
# 4. a baseline test on the baseline prompts (3 by default)
# 5. α sensitivity (8 values by default) and temperature where it means something: T of the `softmax` p-values
#    and T of the mixing weights at a fixed selection (5 values each), with perplexity
# 6. token-level expert counts
# 7. a comparative analysis on the comparison prompts (10): paired t-test, Wilcoxon, Cohen's d, 95 % CI (unit = prompt)
# 8. expert utilisation
# 9. the max_k × α grid and its four plots
# 10. patch vs analyze mode: analyze changes no output
# 11. interactive sliders: α and the mixing-weights temperature
# 12. a computed summary, and the results folder: `bh_routing_results.json`, `comparative_results.csv`,
#     `RESULTS.md`, figures, a zip
#
# It uses notebook 01's calibration when the results folder has it, and calibrates itself otherwise.
#
# **What it costs** (defaults; estimates). On a free Colab **T4** with `allenai/OLMoE-1B-7B-0924` in
# float16: ≈ 14 GiB of the T4's 15 GiB; 5–10 min to download and load the model, then ≈ 20–25 min —
# the α/temperature/max_k sweep is 58 WikiText runs of ~41k tokens each (2.4 M tokens, ≈ 20 min at an
# assumed ~2k tokens/s), the rest (calibration, prompts, diagnostics) a few minutes. The bundled tiny
# model on CPU: a few minutes at the `demo` budget. The sweep is checkpointed: run again to resume.

# %% tags=["parameters"]
# Parameters: edit, then Runtime -> Run all. Papermill injects its values in a cell after this one.
MODEL = "auto"   # "auto": OLMoE-1B-7B on GPU, bundled tiny OLMoE on CPU; "tiny", hub id, folder
BUDGET = "auto"  # "auto": "colab" on GPU, "demo" on CPU; "smoke" (seconds), "demo", "colab", "full"
OUT = "auto"     # results root of 01-03; "auto": Drive (DRIVE), /content (Colab), results/notebooks
DRIVE = False    # Colab: results *and* the Hugging Face cache on Google Drive (survive reconnects)
SEED = 0
REPO_URL = "https://github.com/bh-routing/bh_routing"  # the install source when nothing is uploaded
INTERACTIVE = "auto"   # sliders at the end; "auto": only where a person is looking
ALPHA = 0.05           # BH level of the single-configuration sections
PVALUES = "empirical"  # their p-value model: "empirical", "pooled", "zscore", "softmax"
PVALUE_MODELS = ("softmax", "pooled", "empirical", "zscore")  # compared over ALPHAS
ALPHAS = (0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.50)     # α sensitivity (curve and sweep)
TEMPERATURES = (0.05, 0.1, 0.2, 0.5, 1.0)  # softmax p-values only: calibrated ones refuse T != 1
WEIGHTS_TEMPERATURES = (0.5, 0.75, 1.0, 1.5, 2.0)  # mixing weights at a fixed BH selection
GRID_ALPHAS, MAX_KS = (0.01, 0.05, 0.10), (8, 16, 32, 64)  # the α x max_k grid
TOPK_KS = (16, 32, 64)  # top-k beside BH's max_k
BASELINE_PROMPTS, COMPARISON_PROMPTS = "baseline", "comparison"  # bh_routing.prompt_sets

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
from bh_routing import deep_dive as dd, experiments as ex, session as sessions
from bh_routing.prompt_sets import prompt_set
from bh_routing.prompts import score_prompts

session = sessions.start_session("02", model=MODEL, budget=BUDGET, out=OUT, seed=SEED, drive=DRIVE)
display(session)

# %%
model, tokenizer = session.load_model()  # prints the memory plan it checked
calibration, _, _ = sessions.load_or_calibrate(session, model, tokenizer)  # made by 01, or now
BH = {"strategy": "bh", "alpha": ALPHA, "pvalues": PVALUES, "max_k": 8}
NATIVE = {"strategy": "topk", "k": 8}
baseline_prompts, comparison_prompts = prompt_set(BASELINE_PROMPTS), prompt_set(COMPARISON_PROMPTS)

# %% [markdown]
# ## 1 · BH explained on one real token
#
# The last token of a prompt, in the middle MoE layer. Its 64 p-values are sorted; BH selects every
# expert up to the **last** rank where the sorted p-value is under the line (k/64)·α — even if some
# earlier ones are above it (step-up). The router then clamps the count to [min_k, max_k] = [1, 8].

# %%
one = dd.show_one_token(session, model, tokenizer, calibration, baseline_prompts[2]["prompt"],
                        ALPHA, PVALUES)

# %% [markdown]
# ## 2 · Why naive p-values fail — on the model's own logits
#
# Native routing recorded on held-out WikiText-2 text. For each p-value model: the smallest of a
# token's 64 p-values (BH selects anything on its own only if it is ≤ α/64), the share of tokens
# where that happens, what BH selects with no floor, and the `bh` strategy's mean experts and floor rate
# (min_k = 1).

# %%
held_out = dd.held_out_routing(session, model, tokenizer)  # native routing on held-out WikiText
naive = dd.show_naive_pvalues(session, held_out, calibration, ALPHA)

# %% [markdown]
# ### Calibration quality on held-out text
#
# The calibrated p-values are valid per expert if held-out text is exchangeable with the calibration
# text: on the held-out tokens above, an expert outside the native top-8 should get P(p ≤ q) ≤ q.
# Per layer: KS distance from uniform, the worst excess F(q) − q, and P(p ≤ q)/q; then the experts
# furthest above 1 (anti-conservative).

# %%
dd.show_calibration_quality(session, held_out, calibration)

# %% [markdown]
# ## 3 · P-value models compared: the α ↦ experts map
#
# What BH *would* select (analyze-equivalent: on the native logits above, so later layers see native
# hidden states) for 8 values of α, per p-value model, averaged over layers — and per layer for the
# chosen model. Strategies have to be compared at matched mean k (notebook 03), so this map matters.

# %%
dd.show_alpha_map(session, held_out, calibration, ALPHAS, PVALUE_MODELS, PVALUES)

# %% [markdown]
# ## 4 · Baseline test on the baseline prompts
#
# Each prompt teacher-forced under native top-8 and under BH (patch mode: the model really runs with
# BH's experts), then continued greedily. `nll`: mean negative log-likelihood per prompt token.

# %%
native_base = score_prompts(model, tokenizer, baseline_prompts, NATIVE, label="native top-8",
                               new_tokens=session.budget.new_tokens)  # + a greedy continuation
bh_base = score_prompts(model, tokenizer, baseline_prompts, BH, calibration,
                           label=f"BH α={ALPHA}", new_tokens=session.budget.new_tokens)
baseline = dd.show_baseline(session, native_base, bh_base)

# %% [markdown]
# ## 5 · α and temperature sensitivity: the sweep
#
# The deep-dive sweep, in patch mode on WikiText-2 (the budget's articles), built from the parameters:
# native top-8; BH with each of `PVALUE_MODELS` at every α of `ALPHAS`; BH on `softmax` p-values at
# each of `TEMPERATURES`; BH (`empirical`, α = 0.05) with the mixing weights at each of
# `WEIGHTS_TEMPERATURES`; BH over `GRID_ALPHAS` × `MAX_KS` (section 9) and top-k at each of `TOPK_KS`.
# Each finished run is checkpointed in the results folder: re-running resumes.

# %%
runs = ex.bh_deep_dive(session.budget, alphas=ALPHAS, pvalues=PVALUE_MODELS,
                       temperatures=TEMPERATURES, weights_temperatures=WEIGHTS_TEMPERATURES,
                       grid_alphas=GRID_ALPHAS, max_ks=MAX_KS, topk_ks=TOPK_KS)
context = ex.SweepContext(model, tokenizer, session.model_id, calibration)
ex.run_sweep(context, runs, session.folder / "sweep", name="deep-dive")  # checkpointed: resumes
sweep, sweep_report = dd.show_sweep(session, session.folder / "sweep", PVALUE_MODELS)
dd.show_alpha_sensitivity(session, sweep, PVALUES)

# %%
# Calibrated p-values are ranks, so their selection is temperature-invariant (T != 1 is refused).
# T means something for softmax p-values (1 - softmax(logits / T)) and for the mixing weights.
dd.show_temperatures(session, sweep, ALPHA)

# %% [markdown]
# ## 6 · Token-level expert counts
#
# The complex baseline prompt under BH: experts per token (mean over layers, min–max bars) and per
# token and layer.

# %%
dd.show_token_counts(session, bh_base, baseline_prompts[2]["id"])

# %% [markdown]
# ## 7 · Comparative analysis on the comparison prompts
#
# Native top-8 vs BH on the comparison prompts (ten by default), paired by prompt: mean experts per
# token and layer (native's 8 is fixed by its configuration: shown, not tested), and NLL per token:
# paired t-test, Wilcoxon signed-rank, Cohen's d_z with its CI, and the 95 % CI of the mean
# difference (BH − native). Ten prompts are ten pairs: read the intervals, not just p.

# %%
native_cmp = score_prompts(model, tokenizer, comparison_prompts, NATIVE, label="native top-8")
bh_cmp = score_prompts(model, tokenizer, comparison_prompts, BH, calibration,
                          label=f"BH α={ALPHA}")
tests = dd.show_comparison(session, native_cmp, bh_cmp)

# %% [markdown]
# ## 8 · Expert utilisation: native vs BH (the comparison prompts)

# %%
dd.show_utilisation(session, native_cmp, bh_cmp, model.config.num_experts)

# %% [markdown]
# ## 9 · The max_k × α grid
#
# Does BH want more than 8 experts when allowed? Mean experts and word perplexity over the grid, the
# share of tokens at the ceiling, and BH against top-k at k = max_k.

# %%
dd.show_max_k_grid(session, sweep)

# %% [markdown]
# ## 10 · Patch vs analyze mode
#
# `mode="patch"` routes with the strategy; `mode="analyze"` runs the model natively and records what
# the strategy *would* choose. Analyze must change no output — exactly — and leaving either patch
# must restore the model exactly.

# %%
modes = dd.show_patch_vs_analyze(session, model, tokenizer, comparison_prompts[0]["prompt"], BH,
                                 calibration)

# %% [markdown]
# ## 11 · Interactive: re-route a prompt live
#
# Move α (which experts) and the mixing-weights temperature T (how they are weighted; the selection
# does not depend on it); the prompt is re-routed with BH (patch mode) and the experts per token and the
# next-token predictions update. Needs `ipywidgets` (Colab has it) and a live front end:
# with `INTERACTIVE = "auto"` the sliders never appear in headless runs (papermill, nbclient).

# %%
dd.live_sliders(model, tokenizer, comparison_prompts[5]["prompt"], calibration, ALPHA, PVALUES,
                session.subtitle, interactive=INTERACTIVE)  # sliders only where a person is looking

# %% [markdown]
# ## 12 · Summary (computed from this run)

# %%
dd.show_summary(session, one, naive, baseline, tests, bh_cmp, sweep, sweep_report, modes)

# %% [markdown]
# ## Conclusions, limitations, references
#
# **What this notebook can and cannot conclude.** The readings above are computed from this run and
# describe this model at this budget. Limitations: (1) the calibrated p-values are valid per expert
# only when the evaluated text is exchangeable with the calibration text (section 2 measures how far
# held-out text departs); BH's FDR guarantee additionally assumes independent or positively dependent
# p-values across the 64 experts, which a router's logits need not be — `procedure="by"`
# (Benjamini–Yekutieli) is valid under any dependence, at a cost in power; (2) the 3 + 10 prompts are
# a small sample: read the confidence intervals, not only the p-values; (3) perplexities come from
# the budget's WikiText articles, and on the bundled tiny model (trained on four other domains)
# WikiText numbers say little about quality; (4) fewer mean experts is not less wall-clock time: the
# reference MoE block computes per expert, and no timing here is a benchmark.
#
# **References.** Benjamini & Hochberg (1995), *Controlling the false discovery rate*, JRSS B 57:289–300.
# Benjamini & Yekutieli (2001), *The control of the false discovery rate in multiple testing under
# dependency*, Annals of Statistics 29:1165–1188. Muennighoff et al. (2024), *OLMoE: Open
# Mixture-of-Experts Language Models*, arXiv:2409.02060. Gao et al., *lm-evaluation-harness*
# (v0.4.13 metric definitions).
#
# ## Next steps
#
# - **[03 · Full routing experiments](03_OLMoE_Full_Routing_Experiments.ipynb)** — every strategy,
#   four tasks, corrected paired tests and matched compute: whether BH beats top-k *at equal compute*.
# - Back to **[01 · Baseline](01_OLMoE_Baseline.ipynb)** for the native router these numbers start from.

# %% [markdown]
# ## Results folder
#
# Everything above is in the results folder: JSON, CSV, every figure as PNG and a Markdown report.
# The cell zips it and, on Colab, downloads the zip (elsewhere it says where the zip is).

# %%
session.finish("bh_routing_results.json", "BH routing deep dive (notebook 02)")
