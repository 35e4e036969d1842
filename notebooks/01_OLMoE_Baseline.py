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
MODEL = "auto"   # "auto": OLMoE-1B-7B on a GPU, the tiny bundled OLMoE on CPU; "tiny", hub id, folder
BUDGET = "auto"  # "auto": "colab" on a GPU, "demo" on CPU; or "smoke" (seconds), "demo", "colab", "full"
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
# Install: an uploaded wheel/zip (/content or, with DRIVE, MyDrive) first, then REPO_URL
import glob, importlib, importlib.util, os, subprocess, sys
if importlib.util.find_spec("bh_routing") is None:  # pip keeps the runtime's torch (torch>=2.1)
    if DRIVE and "google.colab" in sys.modules:
        from google.colab import drive
        drive.mount("/content/drive")
    uploads = [path for folder in (".", "/content/drive/MyDrive") for ext in ("whl", "zip")
               for path in sorted(glob.glob(f"{folder}/bh_routing*.{ext}"))]
    for source in uploads[:1] + [f"git+{REPO_URL}"]:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", source],
                             capture_output=True, text=True,
                             env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})  # never ask
        print(f"pip install {source}: " + ("done" if pip.returncode == 0 else pip.stderr[-400:]))
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
import numpy as np
import pandas as pd
from IPython.display import display
from bh_routing import analysis, evaluation as ev, plots, report
from bh_routing import session as sessions, native_routing as native, routing_plots as rplots
from bh_routing.notebook_support import display_markdown, markdown_table, offer_download

session = sessions.start_session("01", model=MODEL, budget=BUDGET, out=OUT, seed=SEED, drive=DRIVE)
FOLDER = session.folder
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
texts = native.text_sources(session.sample_tokens)
sample = native.record_native_routing(model, tokenizer, texts, max_length=512,
                                      max_tokens_per_source=session.sample_tokens,
                                      batch_size=session.batch_size(512))
stats = native.routing_statistics(sample)
display_markdown(native.describe_sample(sample))

# %% [markdown]
# ## 2 · Router-logit distributions per layer

# %%
session.figure(rplots.plot_logit_distributions(sample, session.subtitle), "router_logits",
               "Router logits (all experts vs the top-1) and the top-1 probability per layer.")
display_markdown(native.describe_logits(sample, stats))

# %% [markdown]
# ## 3 · Per-layer statistics
#
# `max_weight_mean`: the largest mixing weight (= top-1 probability; OLMoE does not renormalise);
# `entropy_norm`: routing entropy ÷ log 64 (1 = uniform); `topk_mass` / `mass_left_out`: probability
# inside / outside the native top-8; `top_expert`, `top_expert_usage`: the expert most often in the
# top-8 and the share of tokens it serves (balanced: 8/64 = 12.5 %); `load_cv`, `load_gini`,
# `dead_experts`: load balance over the 64 experts.

# %%
columns = ["layer", "max_weight_mean", "max_weight_median", "entropy_nats", "entropy_norm", "topk_mass",
           "mass_left_out", "top_expert", "top_expert_usage", "top1_expert", "top1_share", "load_cv",
           "load_gini", "dead_experts"]
display_markdown(markdown_table(stats, columns, digits=3))
stats.to_csv(FOLDER / "baseline_routing_stats.csv", index=False)

# %% [markdown]
# ## 4 · Expert usage: layer × expert

# %%
usage = native.expert_usage(sample)  # [layers, experts] tokens routed (native top-8)
session.figure(plots.plot_expert_utilization(usage, subtitle=session.subtitle), "expert_usage_heatmap",
               "Expert usage per layer, relative to the layer's mean load (1 = uniform, 0 = never chosen).")
display_markdown(native.describe_usage(usage, sample.num_tokens))

# %% [markdown]
# ## 5 · Routing entropy across layers

# %%
session.figure(rplots.plot_entropy_across_layers(sample, session.subtitle), "entropy_across_layers",
               "Normalised routing entropy per layer (median and bands over tokens) and the mean top-1 "
               "probability.")
display_markdown(native.describe_entropy(stats))

# %% [markdown]
# ## 6 · Weight concentration: mass in the top-1/2/4/8

# %%
conc = native.concentration(sample, ks=(1, 2, 4, 8))
session.figure(rplots.plot_concentration(conc, session.subtitle), "weight_concentration",
               "Share of the routing mass in the top-1/2/4/8 experts per layer (dotted: uniform router).")
table = conc.pivot(index="layer", columns="k", values="mass")
table = table.rename(columns=lambda k: f"top-{k} mass").reset_index()
display_markdown(markdown_table(table, digits=3))

# %% [markdown]
# ## 7 · Top-8 probability mass left out

# %%
session.figure(rplots.plot_mass_left_out(sample, session.subtitle), "mass_left_out",
               "Routing probability mass outside the native top-8, per layer.")
display_markdown(native.describe_mass_left_out(stats, sample.top_k))

# %% [markdown]
# ## 8 · Co-activation within a layer
#
# Which experts are chosen together? Jaccard similarity of the experts' token sets in the middle layer,
# and the pairs chosen together most beyond chance (lift = P(both) / (P(i)·P(j)); 1 = independent).

# %%
layer = sample.num_layers // 2
jaccard = analysis.coactivation(sample.native_indices()[layer], sample.num_experts, normalize="jaccard")[0]
np.fill_diagonal(jaccard, np.nan)
title = f"Expert co-activation (Jaccard), layer {layer}"
session.figure(plots.plot_coactivation(jaccard, subtitle=session.subtitle, title=title), "coactivation",
               "Expert co-activation (Jaccard) in the middle layer.")
pairs = native.coactivation_pairs(sample, layer, n=10)
pairs.to_csv(FOLDER / "coactivation_pairs.csv", index=False)
display_markdown(markdown_table(pairs, digits=3) + "\n" + native.describe_pairs(pairs, layer))

# %% [markdown]
# ## 9 · Expert usage per kind of text (specialisation)
#
# Do experts specialise? Mutual information between a token's text source and the experts it is routed
# to, per layer, against the same quantity with the source labels shuffled (what a finite sample gives
# by chance); then the source × expert usage of the most specialised layer and the most specific
# (layer, expert, source) triples.

# %%
MIN_SOURCE_TOKENS = min(256, session.sample_tokens // 2)  # the text corpora, not the short prompt groups
spec = native.domain_specialisation(sample, min_tokens=MIN_SOURCE_TOKENS, seed=session.seed)
spec.to_csv(FOLDER / "domain_specialisation.csv", index=False)
session.figure(rplots.plot_specialisation(spec, session.subtitle), "specialisation",
               "Mutual information between text source and chosen expert per layer, with chance level.")
best = int(spec.loc[spec["mi_bits"].idxmax(), "layer"])
usage_by_source = native.domain_usage(sample, best, min_tokens=MIN_SOURCE_TOKENS)
session.figure(rplots.plot_domain_usage(usage_by_source, best, session.subtitle), "domain_usage",
               "Per-source expert usage in the most specialised layer (log2 lift over all text).")
specific = native.specialised_experts(sample, n=10, min_tokens=MIN_SOURCE_TOKENS)
display_markdown(markdown_table(specific, digits=3) + "\n" + native.describe_specialisation(spec, specific))

# %% [markdown]
# ## 10 · Token-level view of three prompts
#
# Per token and layer: the top-1 probability (colour) and the top-1 expert (number).

# %%
token_views = native.token_views(sample, tokenizer, ("prompt: simple", "prompt: complex", "prompt: code"))
token_views.to_csv(FOLDER / "token_view.csv", index=False)
for name, view in token_views.groupby("source", sort=False):
    session.figure(rplots.plot_token_view(view, subtitle=f"{session.subtitle} · {name}"),
                   f"token_view_{name.split(': ')[1]}",
                   "Token-level routing: top-1 probability and top-1 expert per token and layer.")
display_markdown(native.describe_token_views(token_views))

# %% [markdown]
# ## 11 · Calibration for BH's p-values (used by notebooks 02 and 03)
#
# The `empirical` p-value of expert *e* compares its logit with *that expert's own* logits on
# calibration tokens where the native top-8 did **not** pick it; `pooled` uses all logits of the layer.
# One native pass over held-out WikiText-2 articles (never evaluated) gives both; the file is saved in
# the results root, where notebooks 02 and 03 look for it. The smallest p-value a null of n values can
# give is 1/(n+1): BH can select an expert on its own only if that is ≤ α/64.

# %%
calibration, _, how = sessions.load_or_calibrate(session, model, tokenizer)
print(how)
calibration_table = sessions.calibration_summary(calibration)
display_markdown(markdown_table(calibration_table, digits=3))
display_markdown(sessions.describe_calibration(calibration, calibration_table))

# %% [markdown]
# ## 12 · The model as a language model: held-out text of four domains
#
# Token perplexity of the native router on held-out documents of four domains (encyclopedia,
# biomedical, math, code; the `domains` task). The bundled tiny model was trained on these domains with
# these documents held out, so here — unlike on WikiText, HellaSwag or LAMBADA — it is a language
# model; for any other model it is plain text of four kinds.

# %%
max_length = min(1024, ev.resolve_max_length(model, tokenizer))
domain_result = ev.evaluate(model, tokenizer, "domains", max_length=max_length)
domain_table = report.per_domain(domain_result)
display_markdown(markdown_table(domain_table, digits=4))
perplexity = domain_result.metrics["token_perplexity"]
display_markdown(native.describe_domains(perplexity, domain_table, sample.top_k))

# %% [markdown]
# ## 13 · Key observations (computed from this run)

# %%
observations = native.describe_baseline(stats, conc, spec, sample.num_experts, sample.top_k,
                                        model_id=session.model_id)
display_markdown(observations)

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
conc.to_csv(FOLDER / "weight_concentration.csv", index=False)
pd.DataFrame(usage).add_prefix("expert_").rename_axis("layer").to_csv(FOLDER / "expert_usage.csv")
calibration_table.to_csv(FOLDER / "calibration_summary.csv", index=False)
summary = {"tokens": sample.num_tokens, "observations": observations, "per_layer": stats.to_dict("records"),
           "specialisation": spec.to_dict("records"),
           "calibration": {"file": str(session.calibration_path), **calibration.metadata}}
blocks = ["## Key observations", "\n".join(f"- {line}" for line in observations)] + [
    f"## {title}\n\n{markdown_table(frame, digits=4)}" for title, frame in [
        ("Per-layer statistics", stats), ("Weight concentration", table), ("Co-activation", pairs),
        ("Specialisation by text source", spec), ("Most specific experts", specific),
        ("Held-out domain text", domain_table), ("Calibration: " + how, calibration_table)]]
archive = session.finish("baseline_summary.json", summary, "OLMoE baseline routing (notebook 01)", blocks,
                         report_name="BASELINE_REPORT.md")

# %%
print(offer_download(archive))  # a browser download on Colab; skipped elsewhere
