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
# # 01 · OLMoE baseline: what the native top-8 router does
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bh-routing/bh_routing/blob/main/notebooks/01_OLMoE_Baseline.ipynb)
#
# Part 1 of the [bh_routing](https://github.com/bh-routing/bh_routing) suite — **observation only**. OLMoE-1B-7B routes
# every token, in each of its 16 MoE layers, to 8 of 64 experts: a softmax over all 64 router logits, the top-8,
# weights *not* renormalised. Nothing is changed here; we record the router and look:
#
# 1. recording the native routing
# 2. router-logit distributions per layer
# 3. a per-layer table: largest weight, entropy, top-expert usage
# 4. expert usage, layer × expert
# 5. routing entropy across layers
# 6. weight concentration: the mass in the top-1/2/4/8
# 7. the probability mass the top-8 leave out
# 8. co-activation within a layer
# 9. expert usage per kind of text (specialisation)
# 10. a token-level view of three prompts
# 11. the **calibration** pass BH's p-values need, saved for notebooks 02 and 03
# 12. token perplexity on held-out text of four domains (the `domains` task)
# 13. key observations, computed from the run; the results folder: figures, a report, a zip
#
# **What it costs** (defaults; estimates, see the note at the end of the setup section). On a free
# Colab **T4** with `allenai/OLMoE-1B-7B-0924` in float16: ≈ 14 GiB of the T4's 15 GiB (12.9 GiB of
# weights; the memory planner sizes batches to the rest); 5–10 min to download and load the model,
# then ≈ 2–3 min: ~64k tokens recorded (up to 16k per text source) plus 16k calibration tokens at an
# assumed ~2k tokens/s, and the CPU-side statistics. The bundled tiny OLMoE on CPU: under a minute.
#
# **Run it**: Runtime → Change runtime type → T4 GPU; then Runtime → Run all. The parameters cell below
# picks the model and budget (`MODEL = "tiny"` runs the bundled model anywhere).

# %% tags=["parameters"]
# Parameters: edit, then Runtime -> Run all. Papermill injects its values in a cell after this one.
MODEL = "auto"   # "auto": OLMoE-1B-7B on GPU, bundled tiny OLMoE on CPU; "tiny", hub id, folder
BUDGET = "auto"  # "auto": "colab" on GPU, "demo" on CPU; "smoke" (seconds), "demo", "colab", "full"
OUT = "auto"     # results root of 01-03; "auto": Drive (DRIVE), /content (Colab), results/notebooks
DRIVE = False    # Colab: results *and* the Hugging Face cache on Google Drive (survive reconnects)
SEED = 0
REPO_URL = "https://github.com/bh-routing/bh_routing"  # the install source when nothing is uploaded

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
from bh_routing import baseline as bl, session as sessions

session = sessions.start_session("01", model=MODEL, budget=BUDGET, out=OUT, seed=SEED, drive=DRIVE)
display(session)

# %%
model, tokenizer = session.load_model()  # prints the memory plan it checked

# %% [markdown]
# ## 1 · Recording the native routing
#
# The model reads text of several kinds — WikiText-2 articles that calibration never sees
# (encyclopedic), HellaSwag contexts with their correct ending (everyday activities), LAMBADA passages
# (fiction), the held-out documents of four domains shipped with the package (encyclopedia,
# biomedical, math, code) — and the prompt sets' prompts (simple, medium, complex, and one each of
# biomedical, math and code). For every token and MoE layer we keep the router logits (float32).

# %%
sample = bl.record(session, model, tokenizer)  # native routing on every text source

# %% [markdown]
# ## 2 · Router-logit distributions per layer

# %%
stats = bl.show_router_logits(session, sample)

# %% [markdown]
# ## 3 · Per-layer statistics
#
# `max_weight_mean`: the largest mixing weight (= top-1 probability; OLMoE does not renormalise);
# `entropy_norm`: routing entropy ÷ log 64 (1 = uniform); `topk_mass` / `mass_left_out`: probability
# inside / outside the native top-8; `top_expert`, `top_expert_usage`: the expert most often in the
# top-8 and the share of tokens it serves (balanced: 8/64 = 12.5 %); `load_cv`, `load_gini`,
# `dead_experts`: load balance over the 64 experts.

# %%
bl.show_layer_statistics(session, stats)

# %% [markdown]
# ## 4 · Expert usage: layer × expert

# %%
bl.show_usage(session, sample)

# %% [markdown]
# ## 5 · Routing entropy across layers

# %%
bl.show_entropy(session, sample, stats)

# %% [markdown]
# ## 6 · Weight concentration: mass in the top-1/2/4/8

# %%
concentration = bl.show_concentration(session, sample, ks=(1, 2, 4, 8))

# %% [markdown]
# ## 7 · Top-8 probability mass left out

# %%
bl.show_mass_left_out(session, sample, stats)

# %% [markdown]
# ## 8 · Co-activation within a layer
#
# Which experts are chosen together? Jaccard similarity of the experts' token sets in the middle layer,
# and the pairs chosen together most beyond chance (lift = P(both) / (P(i)·P(j)); 1 = independent).

# %%
bl.show_coactivation(session, sample)

# %% [markdown]
# ## 9 · Expert usage per kind of text (specialisation)
#
# Do experts specialise? Mutual information between a token's text source and the experts it is routed
# to, per layer, against the same quantity with the source labels shuffled (what a finite sample gives
# by chance); then the source × expert usage of the most specialised layer and the most specific
# (layer, expert, source) triples.

# %%
specialisation = bl.show_specialisation(session, sample)

# %% [markdown]
# ## 10 · Token-level view of three prompts
#
# Per token and layer: the top-1 probability (colour) and the top-1 expert (number).

# %%
bl.show_token_views(session, sample, tokenizer)

# %% [markdown]
# ## 11 · Calibration for BH's p-values (used by notebooks 02 and 03)
#
# The `empirical` p-value of expert *e* compares its logit with *that expert's own* logits on
# calibration tokens where the native top-8 did **not** pick it; `pooled` uses all logits of the layer.
# One native pass over held-out WikiText-2 articles (never evaluated) gives both; the file is saved in
# the results root, where notebooks 02 and 03 look for it. The smallest p-value a null of n values can
# give is 1/(n+1): BH can select an expert on its own only if that is ≤ α/64.

# %%
calibration = bl.show_calibration(session, model, tokenizer)  # shared with notebooks 02 and 03

# %% [markdown]
# ## 12 · The model as a language model: held-out text of four domains
#
# Token perplexity of the native router on held-out documents of four domains (encyclopedia,
# biomedical, math, code; the `domains` task). The bundled tiny model was trained on these domains with
# these documents held out, so here — unlike on WikiText, HellaSwag or LAMBADA — it is a language
# model; for any other model it is plain text of four kinds.

# %%
bl.show_domains(session, model, tokenizer, sample.top_k)

# %% [markdown]
# ## 13 · Key observations (computed from this run)

# %%
bl.show_observations(session, sample, stats, concentration, specialisation)

# %% [markdown]
# ## Next steps
#
# - **[02 · BH routing, a deep dive](02_OLMoE_BenjaminiHochberg_Routing.ipynb)** — uses the calibration
#   this notebook saved in the results root (same `OUT`, same `MODEL`): BH on one token, why naive
#   p-values fail, α / temperature / max_k sensitivity, paired tests on prompts.
# - **[03 · Full routing experiments](03_OLMoE_Full_Routing_Experiments.ipynb)** — every strategy on
#   four tasks, Pareto plots, paired significance against native top-8, matched compute.

# %% [markdown]
# ## Results folder
#
# Everything above is in the results folder: JSON, CSV, every figure as PNG and a Markdown report.
# The cell zips it and, on Colab, downloads the zip (elsewhere it says where the zip is).

# %%
session.finish("baseline_summary.json", "OLMoE baseline routing (notebook 01)",
               report_name="BASELINE_REPORT.md")
