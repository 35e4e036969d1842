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
MODEL = "auto"   # "auto": OLMoE-1B-7B on a GPU, the bundled tiny OLMoE on CPU; "tiny", a hub id, a folder
BUDGET = "auto"  # "auto": "colab" on a GPU, "demo" on CPU; or "smoke" (seconds), "demo", "colab", "full"
OUT = "auto"     # results root shared by 01-03; "auto": Drive (DRIVE), /content (Colab), results/notebooks
DRIVE = False    # Colab: keep results *and* the Hugging Face model cache on Google Drive (survive reconnects)
SEED = 0
REPO_URL = "https://github.com/bh-routing/bh_routing"  # the install cell's source when nothing is uploaded

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
from bh_routing import session as sessions, native_routing as native, routing_plots as rplots
from bh_routing import notebook_support as nbs
from bh_routing.models import describe_model, load_model

session = sessions.start_session("01", model=MODEL, budget=BUDGET, out=OUT, seed=SEED, drive=DRIVE)
FOLDER = session.folder
display(session)

# %%
model, tokenizer = load_model(session.model_id, dtype=session.dtype)  # prints the memory plan it checked
print(f"{type(model).__name__}: {model.config.num_hidden_layers} layers, {model.config.num_experts} experts, "
      f"top-{model.config.num_experts_per_tok}, {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters")
nbs.display_markdown(f"**Model:** {describe_model(session.model_id)}. Every number below is about this model.")

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
sample = native.record_native_routing(model, tokenizer, texts, max_length=512, max_tokens_per_source=session.sample_tokens,
                                   batch_size=session.batch_size(512))
stats = native.routing_statistics(sample)
nbs.display_markdown(
    f"Recorded **{sample.num_tokens:,} tokens** × {sample.num_layers} MoE layers × {sample.num_experts} experts "
    f"(native top-{sample.top_k}) from {len(sample.sources)} sources: "
    + ", ".join(f"{name} ({(sample.source == name).sum():,})" for name in sample.sources) + ".")

# %% [markdown]
# ## 2 · Router-logit distributions per layer

# %%
session.figure(rplots.plot_logit_distributions(sample, session.subtitle), "router_logits",
               "Router logits (all experts vs the top-1) and the top-1 probability per layer.")

# %%
gap = [float((l.max(dim=1).values - l.median(dim=1).values).mean()) for l in sample.logits]
nbs.display_markdown(
    f"Router logits have a standard deviation of {stats['logit_std'].min():.2f}–{stats['logit_std'].max():.2f} per layer; "
    f"a token's top-1 logit lies on average {min(gap):.2f}–{max(gap):.2f} above its median logit. After the softmax "
    f"the top-1 probability has a median of {stats['max_weight_median'].min():.3f}–{stats['max_weight_median'].max():.3f} "
    f"per layer, against {1 / sample.num_experts:.3f} for a uniform router.")

# %% [markdown]
# ## 3 · Per-layer statistics
#
# `max_weight_mean`: the largest mixing weight (= top-1 probability; OLMoE does not renormalise);
# `entropy_norm`: routing entropy ÷ log 64 (1 = uniform); `topk_mass` / `mass_left_out`: probability
# inside / outside the native top-8; `top_expert`, `top_expert_usage`: the expert most often in the
# top-8 and the share of tokens it serves (balanced: 8/64 = 12.5 %); `load_cv`, `load_gini`,
# `dead_experts`: load balance over the 64 experts.

# %%
columns = ["layer", "max_weight_mean", "max_weight_median", "entropy_nats", "entropy_norm", "topk_mass", "mass_left_out",
           "top_expert", "top_expert_usage", "top1_expert", "top1_share", "load_cv", "load_gini", "dead_experts"]
nbs.display_markdown(nbs.markdown_table(stats, columns, digits=3))
stats.to_csv(FOLDER / "baseline_routing_stats.csv", index=False)

# %% [markdown]
# ## 4 · Expert usage: layer × expert

# %%
usage = native.expert_usage(sample)  # [layers, experts] tokens routed (native top-8)
session.figure(plots.plot_expert_utilization(usage, subtitle=session.subtitle), "expert_usage_heatmap",
               "Expert usage per layer, relative to the layer's mean load (1 = uniform, 0 = never chosen).")
relative = usage / usage.mean(axis=1, keepdims=True)
hot = np.unravel_index(relative.argmax(), relative.shape)
nbs.display_markdown(
    f"The busiest (layer, expert) is layer {hot[0]}, expert {hot[1]}, at {relative.max():.1f}× its layer's mean load; "
    f"{int((usage == 0).sum())} of {usage.size} (layer, expert) pairs were never chosen on these {sample.num_tokens:,} tokens, "
    f"and {int((relative < 0.25).sum())} get less than a quarter of the mean load.")

# %% [markdown]
# ## 5 · Routing entropy across layers

# %%
session.figure(rplots.plot_entropy_across_layers(sample, session.subtitle), "entropy_across_layers",
               "Normalised routing entropy per layer (median and bands over tokens) and the mean top-1 probability.")
nbs.display_markdown(
    f"Mean normalised entropy per layer: " + ", ".join(f"{e:.2f}" for e in stats["entropy_norm"]) +
    f" (layers 0–{sample.num_layers - 1}). The flattest layer is {int(stats.loc[stats['entropy_norm'].idxmax(), 'layer'])}, "
    f"the most decisive {int(stats.loc[stats['entropy_norm'].idxmin(), 'layer'])}.")

# %% [markdown]
# ## 6 · Weight concentration: mass in the top-1/2/4/8

# %%
conc = native.concentration(sample, ks=(1, 2, 4, 8))
session.figure(rplots.plot_concentration(conc, session.subtitle), "weight_concentration",
               "Share of the routing mass in the top-1/2/4/8 experts per layer (dotted: uniform router).")
table = conc.pivot(index="layer", columns="k", values="mass").rename(columns=lambda k: f"top-{k} mass").reset_index()
nbs.display_markdown(nbs.markdown_table(table, digits=3))

# %% [markdown]
# ## 7 · Top-8 probability mass left out

# %%
session.figure(rplots.plot_mass_left_out(sample, session.subtitle), "mass_left_out",
               "Routing probability mass outside the native top-8, per layer.")
worst = stats.loc[stats["mass_left_out"].idxmax()]
nbs.display_markdown(
    f"The top-{sample.top_k} leave out {stats['mass_left_out'].mean():.1%} of the routing probability on average "
    f"(layer {int(worst['layer'])}: {worst['mass_left_out']:.1%}). Because OLMoE does not renormalise, the mixing "
    f"weights of a token sum to its top-{sample.top_k} mass, {stats['topk_mass'].mean():.2f} on average, not 1.")

# %% [markdown]
# ## 8 · Co-activation within a layer
#
# Which experts are chosen together? Jaccard similarity of the experts' token sets in the middle layer,
# and the pairs chosen together most beyond chance (lift = P(both) / (P(i)·P(j)); 1 = independent).

# %%
layer = sample.num_layers // 2
jaccard = analysis.coactivation(sample.native_indices()[layer], sample.num_experts, normalize="jaccard")[0]
np.fill_diagonal(jaccard, np.nan)
session.figure(plots.plot_coactivation(jaccard, subtitle=session.subtitle, title=f"Expert co-activation (Jaccard), layer {layer}"), "coactivation",
               "Expert co-activation (Jaccard) in the middle layer.")
pairs = native.coactivation_pairs(sample, layer, n=10)
pairs.to_csv(FOLDER / "coactivation_pairs.csv", index=False)
nbs.display_markdown(nbs.markdown_table(pairs, digits=3))
if len(pairs):
    top = pairs.iloc[0]
    nbs.display_markdown(f"Strongest pair in layer {layer}: experts {int(top['expert_i'])} and {int(top['expert_j'])}, chosen "
                         f"together for {int(top['together'])} tokens, {top['lift']:.1f}× what independent choices would give.")

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
               "Mutual information between text source and chosen expert per layer, with the shuffled-label chance level.")
best_layer = int(spec.loc[spec["mi_bits"].idxmax(), "layer"])
session.figure(rplots.plot_domain_usage(native.domain_usage(sample, best_layer, min_tokens=MIN_SOURCE_TOKENS), best_layer, session.subtitle), "domain_usage",
               "Per-source expert usage in the most specialised layer (log2 lift over all text).")
specific = native.specialised_experts(sample, n=10, min_tokens=MIN_SOURCE_TOKENS)
nbs.display_markdown(nbs.markdown_table(specific, digits=3))
nbs.display_markdown(
    f"I(source; expert) ranges {spec['mi_bits'].min():.3f}–{spec['mi_bits'].max():.3f} bits over layers "
    f"(chance level {spec['mi_shuffled_bits'].mean():.3f}); the most specialised layer is {best_layer}. "
    + (f"The most specific expert: layer {int(specific.iloc[0]['layer'])}, expert {int(specific.iloc[0]['expert'])}, which "
       f"{specific.iloc[0]['source']} uses {specific.iloc[0]['lift']:.1f}× as often as text overall." if len(specific) else ""))

# %% [markdown]
# ## 10 · Token-level view of three prompts
#
# Per token and layer: the top-1 probability (colour) and the top-1 expert (number).

# %%
views = []
for name in ("prompt: simple", "prompt: complex", "prompt: code"):
    if name not in sample.sources:
        continue
    text = int(sample.text[sample.source == name][0])
    view = native.token_view(sample, tokenizer, text)
    views.append(view.assign(source=name))
    slug = name.split(": ")[1]
    session.figure(rplots.plot_token_view(view, subtitle=f"{session.subtitle} · {name}"), f"token_view_{slug}",
                   "Token-level routing: top-1 probability and top-1 expert per token and layer.")
token_views = pd.concat(views, ignore_index=True) if views else pd.DataFrame()
token_views.to_csv(FOLDER / "token_view.csv", index=False)
if views:
    per_token = token_views.groupby(["source", "position", "token"], sort=False)["top1_prob"].mean().reset_index()
    sure, unsure = per_token.loc[per_token["top1_prob"].idxmax()], per_token.loc[per_token["top1_prob"].idxmin()]
    nbs.display_markdown(f"Across layers the router is most decided on {sure['token']!r} ({sure['source']}, mean top-1 "
                         f"probability {sure['top1_prob']:.3f}) and least on {unsure['token']!r} ({unsure['source']}, "
                         f"{unsure['top1_prob']:.3f}).")

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
nbs.display_markdown(nbs.markdown_table(calibration_table, digits=3))
reach = [a for a in (0.01, 0.05, 0.10) if calibration_table[f"reaches α/N at α={a}"].all()]
nbs.display_markdown(
    f"Calibrated on {calibration.metadata['tokens']:,} tokens; each expert's null holds "
    f"{int(calibration_table['null_min'].min()):,}–{int(calibration_table['null_max'].max()):,} logits, so the smallest "
    f"empirical p-value is {calibration_table['smallest_p'].max():.2e} or less. "
    + (f"That is below α/64 for α ∈ {{{', '.join(map(str, reach))}}} in every layer." if reach
       else "That is above α/64 at α = 0.10 in some layer: calibrate on more tokens (a larger budget) for small α."))

# %% [markdown]
# ## 12 · The model as a language model: held-out text of four domains
#
# Token perplexity of the native router on held-out documents of four domains (encyclopedia,
# biomedical, math, code; the `domains` task). The bundled tiny model was trained on these domains with
# these documents held out, so here — unlike on WikiText, HellaSwag or LAMBADA — it is a language
# model; for any other model it is plain text of four kinds.

# %%
from bh_routing import evaluation as ev, report
domain_result = ev.evaluate(model, tokenizer, "domains", max_length=min(1024, ev.resolve_max_length(model, tokenizer)))
domain_table = report.per_domain(domain_result)
nbs.display_markdown(nbs.markdown_table(domain_table, digits=4))
nbs.display_markdown(f"Native top-{sample.top_k}: token perplexity {domain_result.metrics['token_perplexity']:.4g} over "
                     f"{int(domain_table['tokens'].sum()):,} held-out tokens; by domain "
                     + ", ".join(f"{r.domain} {r.token_perplexity:.4g}" for r in domain_table.itertuples()) + ".")

# %% [markdown]
# ## 13 · Key observations (computed from this run)

# %%
observations = native.describe_baseline(stats, conc, spec, sample.num_experts, sample.top_k, model_id=session.model_id)
nbs.display_markdown(observations)

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
pd.DataFrame(usage, columns=[f"expert_{e}" for e in range(sample.num_experts)]).rename_axis("layer").to_csv(FOLDER / "expert_usage.csv")
calibration_table.to_csv(FOLDER / "calibration_summary.csv", index=False)
summary = {"session": session.describe(), "tokens": sample.num_tokens,
           "sources": {name: int((sample.source == name).sum()) for name in sample.sources},
           "observations": observations, "per_layer": stats.to_dict("records"),
           "specialisation": spec.to_dict("records"), "calibration": {"file": str(session.calibration_path), **calibration.metadata},
           "seconds": round(session.elapsed, 1)}
nbs.write_json(FOLDER / "baseline_summary.json", summary)
nbs.write_report(FOLDER / "BASELINE_REPORT.md", "OLMoE baseline routing (notebook 01)", session, [
    "## Key observations", "\n".join(f"- {line}" for line in observations),
    "## Per-layer statistics", nbs.markdown_table(stats, columns, digits=3),
    "## Weight concentration", nbs.markdown_table(table, digits=3),
    f"## Co-activation, layer {layer}", nbs.markdown_table(pairs, digits=3),
    "## Specialisation by text source", nbs.markdown_table(spec, digits=3), nbs.markdown_table(specific, digits=3),
    "## Held-out domain text (token perplexity)", nbs.markdown_table(domain_table, digits=4),
    "## Calibration", how, nbs.markdown_table(calibration_table, digits=3)])
archive = nbs.zip_folder(FOLDER)
print(f"{len(list(FOLDER.glob('*.png')))} figures, {len(list(FOLDER.glob('*.csv')))} CSV files -> {archive}")
print(f"notebook 01 took {session.elapsed:.0f} s")

# %%
print(nbs.offer_download(archive))  # a browser download on Colab; skipped elsewhere
