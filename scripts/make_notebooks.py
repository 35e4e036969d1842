#!/usr/bin/env python
"""Generate the three notebooks of the suite from this file, outputs stripped.

    python scripts/make_notebooks.py            # (re)write notebooks/*.ipynb
    python scripts/make_notebooks.py --check    # exit 1 if a committed notebook differs from this file

The notebooks are thin: parameters, setup, calls into ``bh_routing`` (chiefly
``bh_routing.notebook_support``), figures, and Markdown readings computed from the run. Edit the
cells here, not in Jupyter, so they stay reviewable and regenerable; cell ids are stable.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

REPO_URL = "https://github.com/bh-routing/bh_routing"
COLAB_URL = "https://colab.research.google.com/github/bh-routing/bh_routing/blob/main/notebooks/{name}.ipynb"
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

NAMES = {
    "01": "01_OLMoE_Baseline",
    "02": "02_OLMoE_BenjaminiHochberg_Routing",
    "03": "03_OLMoE_Full_Routing_Experiments",
}


def badge(key: str) -> str:
    return BADGE.format(url=COLAB_URL.format(name=NAMES[key]))


# --------------------------------------------------------------------------- shared cells

PARAMETERS_COMMON = '''\
# Parameters (papermill-style: this cell is tagged "parameters"; edit it, then Run all).
MODEL = "auto"   # "auto": allenai/OLMoE-1B-7B-0924 on a GPU, the bundled tiny OLMoE on CPU; or "tiny", a hub id, a local folder
BUDGET = "auto"  # "auto": "colab" on a GPU, "demo" on CPU; or "smoke" (seconds, for CI), "demo", "colab", "full"
OUT = "auto"     # results root shared by notebooks 01-03; "auto": /content/bh_routing_results on Colab, results/notebooks in a checkout
DRIVE = False    # Colab only: keep OUT on Google Drive (MyDrive/bh_routing_results) so a disconnect loses nothing
SEED = 0
'''

SETUP_MD = '''\
## Setup

On Colab this cell clones the repository and installs only what is missing (`pip` skips what is
installed; `requirements_bh.txt` has no torch, so Colab's CUDA build stays). Locally the package is
assumed installed (`bash scripts/setup.sh` in a checkout). It then resolves the parameters — model,
budget, device, dtype, and the memory plan that decides batch sizes — and reports the hardware and
versions.

*About the cost estimates above*: token counts are exact (the evaluator's own requests, OLMoE's
tokenizer); times assume ~2,000 tokens/s for OLMoE-1B-7B in float16 on a T4 — not measured (derived
from ~2.7 GFLOP per token against the T4's fp16 throughput, with a wide margin for small per-expert
matrix products) — and memory comes from `bh_routing.models.memory_plan`.'''

SETUP_CODE = '''\
import importlib, importlib.util, os, subprocess, sys

REPO_URL = "{repo}"
if importlib.util.find_spec("bh_routing") is None:
    if "google.colab" not in sys.modules:
        raise ModuleNotFoundError("bh_routing is not installed: in a checkout run `bash scripts/setup.sh` "
                                  "(or `pip install -e .`) and restart the kernel")
    repo = "/content/bh_routing_repo"
    if not os.path.isdir(repo):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, repo], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", f"{{repo}}/requirements_bh.txt"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", repo], check=True)
    sys.path.insert(0, repo)
    importlib.invalidate_caches()

import numpy as np
import pandas as pd
import torch
from IPython.display import display

from bh_routing import analysis, plots
from bh_routing import notebook_support as nbs
from bh_routing.models import describe_model, load_model

session = nbs.start_session("{key}", model=MODEL, budget=BUDGET, out=OUT, seed=SEED, drive=DRIVE)
FOLDER = session.folder
FIGURES = []  # (png name, caption) for the Markdown report
display(session)
'''

LOAD_CODE = '''\
model, tokenizer = load_model(session.model_id, dtype=session.dtype)  # prints the memory plan it checked
print(f"{type(model).__name__}: {model.config.num_hidden_layers} layers, {model.config.num_experts} experts, "
      f"top-{model.config.num_experts_per_tok}, {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters")
nbs.display_markdown(f"**Model:** {describe_model(session.model_id)}. Every number below is about this model.")
'''

EXPORT_MD = '''\
## Results folder

Everything above is in the results folder: JSON, CSV, every figure as PNG and a Markdown report.
The cell zips it and, on Colab, downloads the zip (elsewhere it says where the zip is).'''


def figure(name: str, call: str, caption: str, indent: str = "") -> str:
    """Code that saves the figure as <FOLDER>/<name>.png, shows it and lists it for the report;
    a ``name`` with {placeholders} becomes an f-string."""
    quote = 'f"' if "{" in name else '"'
    return (f'{indent}nbs.show({call}, FOLDER / {quote}{name}.png")\n'
            f'{indent}FIGURES.append(({quote}{name}.png", "{caption}"))')


# --------------------------------------------------------------------------- notebook 01

NB01 = [
    ("md", f'''\
# 01 · OLMoE baseline: what the native top-8 router does

{badge("01")}

Part 1 of the [bh_routing]({REPO_URL}) suite — **observation only**. OLMoE-1B-7B routes
every token, in each of its 16 MoE layers, to 8 of 64 experts: a softmax over all 64 router logits, the top-8,
weights *not* renormalised. Nothing is changed here; we record the router and look:

1. recording the native routing
2. router-logit distributions per layer
3. a per-layer table: largest weight, entropy, top-expert usage
4. expert usage, layer × expert
5. routing entropy across layers
6. weight concentration: the mass in the top-1/2/4/8
7. the probability mass the top-8 leave out
8. co-activation within a layer
9. expert usage per kind of text (specialisation)
10. a token-level view of three prompts
11. the **calibration** pass BH's p-values need, saved for notebooks 02 and 03
12. token perplexity on held-out text of four domains (the `domains` task)
13. key observations, computed from the run; the results folder: figures, a report, a zip

**What it costs** (defaults; estimates, see the note at the end of the setup section). On a free
Colab **T4** with `allenai/OLMoE-1B-7B-0924` in float16: ≈ 14 GiB of the T4's 15 GiB (12.9 GiB of
weights; the memory planner sizes batches to the rest); 5–10 min to download and load the model,
then ≈ 2–3 min: ~64k tokens recorded (up to 16k per text source) plus 16k calibration tokens at an
assumed ~2k tokens/s, and the CPU-side statistics. The bundled tiny OLMoE on CPU: under a minute.

**Run it**: Runtime → Change runtime type → T4 GPU; then Runtime → Run all. The parameters cell below
picks the model and budget (`MODEL = "tiny"` runs the bundled model anywhere).'''),
    ("code", PARAMETERS_COMMON, ["parameters"]),
    ("md", SETUP_MD),
    ("code", SETUP_CODE.format(repo=REPO_URL, key="01")),
    ("code", LOAD_CODE),
    ("md", '''\
## 1 · Recording the native routing

The model reads text of several kinds — WikiText-2 articles that calibration never sees
(encyclopedic), HellaSwag contexts with their correct ending (everyday activities), LAMBADA passages
(fiction), the held-out documents of four domains shipped with the package (encyclopedia,
biomedical, math, code) — and the prompt sets' prompts (simple, medium, complex, and one each of
biomedical, math and code). For every token and MoE layer we keep the router logits (float32).'''),
    ("code", '''\
texts = nbs.text_sources(session.sample_tokens)
sample = nbs.record_native_routing(model, tokenizer, texts, max_length=512, max_tokens_per_source=session.sample_tokens,
                                   batch_size=session.batch_size(512))
stats = nbs.routing_statistics(sample)
nbs.display_markdown(
    f"Recorded **{sample.num_tokens:,} tokens** × {sample.num_layers} MoE layers × {sample.num_experts} experts "
    f"(native top-{sample.top_k}) from {len(sample.sources)} sources: "
    + ", ".join(f"{name} ({(sample.source == name).sum():,})" for name in sample.sources) + ".")'''),
    ("md", "## 2 · Router-logit distributions per layer"),
    ("code", figure("router_logits", "nbs.plot_logit_distributions(sample, session.subtitle)",
                    "Router logits (all experts vs the top-1) and the top-1 probability per layer.")),
    ("code", '''\
gap = [float((l.max(dim=1).values - l.median(dim=1).values).mean()) for l in sample.logits]
nbs.display_markdown(
    f"Router logits have a standard deviation of {stats['logit_std'].min():.2f}–{stats['logit_std'].max():.2f} per layer; "
    f"a token's top-1 logit lies on average {min(gap):.2f}–{max(gap):.2f} above its median logit. After the softmax "
    f"the top-1 probability has a median of {stats['max_weight_median'].min():.3f}–{stats['max_weight_median'].max():.3f} "
    f"per layer, against {1 / sample.num_experts:.3f} for a uniform router.")'''),
    ("md", '''\
## 3 · Per-layer statistics

`max_weight_mean`: the largest mixing weight (= top-1 probability; OLMoE does not renormalise);
`entropy_norm`: routing entropy ÷ log 64 (1 = uniform); `topk_mass` / `mass_left_out`: probability
inside / outside the native top-8; `top_expert`, `top_expert_usage`: the expert most often in the
top-8 and the share of tokens it serves (balanced: 8/64 = 12.5 %); `load_cv`, `load_gini`,
`dead_experts`: load balance over the 64 experts.'''),
    ("code", '''\
columns = ["layer", "max_weight_mean", "max_weight_median", "entropy_nats", "entropy_norm", "topk_mass", "mass_left_out",
           "top_expert", "top_expert_usage", "top1_expert", "top1_share", "load_cv", "load_gini", "dead_experts"]
nbs.display_markdown(nbs.markdown_table(stats, columns, digits=3))
stats.to_csv(FOLDER / "baseline_routing_stats.csv", index=False)'''),
    ("md", "## 4 · Expert usage: layer × expert"),
    ("code", '''\
usage = nbs.expert_usage(sample)  # [layers, experts] tokens routed (native top-8)
''' + figure("expert_usage_heatmap", "plots.plot_expert_utilization(usage, subtitle=session.subtitle)",
             "Expert usage per layer, relative to the layer's mean load (1 = uniform, 0 = never chosen).") + '''
relative = usage / usage.mean(axis=1, keepdims=True)
hot = np.unravel_index(relative.argmax(), relative.shape)
nbs.display_markdown(
    f"The busiest (layer, expert) is layer {hot[0]}, expert {hot[1]}, at {relative.max():.1f}× its layer's mean load; "
    f"{int((usage == 0).sum())} of {usage.size} (layer, expert) pairs were never chosen on these {sample.num_tokens:,} tokens, "
    f"and {int((relative < 0.25).sum())} get less than a quarter of the mean load.")'''),
    ("md", "## 5 · Routing entropy across layers"),
    ("code", figure("entropy_across_layers", "nbs.plot_entropy_across_layers(sample, session.subtitle)",
                    "Normalised routing entropy per layer (median and bands over tokens) and the mean top-1 probability.") + '''
nbs.display_markdown(
    f"Mean normalised entropy per layer: " + ", ".join(f"{e:.2f}" for e in stats["entropy_norm"]) +
    f" (layers 0–{sample.num_layers - 1}). The flattest layer is {int(stats.loc[stats['entropy_norm'].idxmax(), 'layer'])}, "
    f"the most decisive {int(stats.loc[stats['entropy_norm'].idxmin(), 'layer'])}.")'''),
    ("md", "## 6 · Weight concentration: mass in the top-1/2/4/8"),
    ("code", '''\
conc = nbs.concentration(sample, ks=(1, 2, 4, 8))
''' + figure("weight_concentration", "nbs.plot_concentration(conc, session.subtitle)",
             "Share of the routing mass in the top-1/2/4/8 experts per layer (dotted: uniform router).") + '''
table = conc.pivot(index="layer", columns="k", values="mass").rename(columns=lambda k: f"top-{k} mass").reset_index()
nbs.display_markdown(nbs.markdown_table(table, digits=3))'''),
    ("md", "## 7 · Top-8 probability mass left out"),
    ("code", figure("mass_left_out", "nbs.plot_mass_left_out(sample, session.subtitle)",
                    "Routing probability mass outside the native top-8, per layer.") + '''
worst = stats.loc[stats["mass_left_out"].idxmax()]
nbs.display_markdown(
    f"The top-{sample.top_k} leave out {stats['mass_left_out'].mean():.1%} of the routing probability on average "
    f"(layer {int(worst['layer'])}: {worst['mass_left_out']:.1%}). Because OLMoE does not renormalise, the mixing "
    f"weights of a token sum to its top-{sample.top_k} mass, {stats['topk_mass'].mean():.2f} on average, not 1.")'''),
    ("md", '''\
## 8 · Co-activation within a layer

Which experts are chosen together? Jaccard similarity of the experts' token sets in the middle layer,
and the pairs chosen together most beyond chance (lift = P(both) / (P(i)·P(j)); 1 = independent).'''),
    ("code", '''\
layer = sample.num_layers // 2
jaccard = analysis.coactivation(sample.native_indices()[layer], sample.num_experts, normalize="jaccard")[0]
np.fill_diagonal(jaccard, np.nan)
''' + figure("coactivation", 'plots.plot_coactivation(jaccard, subtitle=session.subtitle, title=f"Expert co-activation (Jaccard), layer {layer}")',
             "Expert co-activation (Jaccard) in the middle layer.") + '''
pairs = nbs.coactivation_pairs(sample, layer, n=10)
pairs.to_csv(FOLDER / "coactivation_pairs.csv", index=False)
nbs.display_markdown(nbs.markdown_table(pairs, digits=3))
if len(pairs):
    top = pairs.iloc[0]
    nbs.display_markdown(f"Strongest pair in layer {layer}: experts {int(top['expert_i'])} and {int(top['expert_j'])}, chosen "
                         f"together for {int(top['together'])} tokens, {top['lift']:.1f}× what independent choices would give.")'''),
    ("md", '''\
## 9 · Expert usage per kind of text (specialisation)

Do experts specialise? Mutual information between a token's text source and the experts it is routed
to, per layer, against the same quantity with the source labels shuffled (what a finite sample gives
by chance); then the source × expert usage of the most specialised layer and the most specific
(layer, expert, source) triples.'''),
    ("code", '''\
MIN_SOURCE_TOKENS = min(256, session.sample_tokens // 2)  # the text corpora, not the short prompt groups
spec = nbs.domain_specialisation(sample, min_tokens=MIN_SOURCE_TOKENS, seed=session.seed)
spec.to_csv(FOLDER / "domain_specialisation.csv", index=False)
''' + figure("specialisation", "nbs.plot_specialisation(spec, session.subtitle)",
             "Mutual information between text source and chosen expert per layer, with the shuffled-label chance level.") + '''
best_layer = int(spec.loc[spec["mi_bits"].idxmax(), "layer"])
''' + figure("domain_usage", "nbs.plot_domain_usage(nbs.domain_usage(sample, best_layer, min_tokens=MIN_SOURCE_TOKENS), best_layer, session.subtitle)",
             "Per-source expert usage in the most specialised layer (log2 lift over all text).") + '''
specific = nbs.specialised_experts(sample, n=10, min_tokens=MIN_SOURCE_TOKENS)
nbs.display_markdown(nbs.markdown_table(specific, digits=3))
nbs.display_markdown(
    f"I(source; expert) ranges {spec['mi_bits'].min():.3f}–{spec['mi_bits'].max():.3f} bits over layers "
    f"(chance level {spec['mi_shuffled_bits'].mean():.3f}); the most specialised layer is {best_layer}. "
    + (f"The most specific expert: layer {int(specific.iloc[0]['layer'])}, expert {int(specific.iloc[0]['expert'])}, which "
       f"{specific.iloc[0]['source']} uses {specific.iloc[0]['lift']:.1f}× as often as text overall." if len(specific) else ""))'''),
    ("md", '''\
## 10 · Token-level view of three prompts

Per token and layer: the top-1 probability (colour) and the top-1 expert (number).'''),
    ("code", '''\
views = []
for name in ("prompt: simple", "prompt: complex", "prompt: code"):
    if name not in sample.sources:
        continue
    text = int(sample.text[sample.source == name][0])
    view = nbs.token_view(sample, tokenizer, text)
    views.append(view.assign(source=name))
    slug = name.split(": ")[1]
''' + figure("token_view_{slug}", 'nbs.plot_token_view(view, subtitle=f"{session.subtitle} · {name}")',
                    "Token-level routing: top-1 probability and top-1 expert per token and layer.", indent="    ") + '''
token_views = pd.concat(views, ignore_index=True) if views else pd.DataFrame()
token_views.to_csv(FOLDER / "token_view.csv", index=False)
if views:
    per_token = token_views.groupby(["source", "position", "token"], sort=False)["top1_prob"].mean().reset_index()
    sure, unsure = per_token.loc[per_token["top1_prob"].idxmax()], per_token.loc[per_token["top1_prob"].idxmin()]
    nbs.display_markdown(f"Across layers the router is most decided on {sure['token']!r} ({sure['source']}, mean top-1 "
                         f"probability {sure['top1_prob']:.3f}) and least on {unsure['token']!r} ({unsure['source']}, "
                         f"{unsure['top1_prob']:.3f}).")'''),
    ("md", '''\
## 11 · Calibration for BH's p-values (used by notebooks 02 and 03)

The `empirical` p-value of expert *e* compares its logit with *that expert's own* logits on
calibration tokens where the native top-8 did **not** pick it; `pooled` uses all logits of the layer.
One native pass over held-out WikiText-2 articles (never evaluated) gives both; the file is saved in
the results root, where notebooks 02 and 03 look for it. The smallest p-value a null of n values can
give is 1/(n+1): BH can select an expert on its own only if that is ≤ α/64.'''),
    ("code", '''\
calibration, _, how = nbs.load_or_calibrate(session, model, tokenizer)
print(how)
calibration_table = nbs.calibration_summary(calibration)
nbs.display_markdown(nbs.markdown_table(calibration_table, digits=3))
reach = [a for a in (0.01, 0.05, 0.10) if calibration_table[f"reaches α/N at α={a}"].all()]
nbs.display_markdown(
    f"Calibrated on {calibration.metadata['tokens']:,} tokens; each expert's null holds "
    f"{int(calibration_table['null_min'].min()):,}–{int(calibration_table['null_max'].max()):,} logits, so the smallest "
    f"empirical p-value is {calibration_table['smallest_p'].max():.2e} or less. "
    + (f"That is below α/64 for α ∈ {{{', '.join(map(str, reach))}}} in every layer." if reach
       else "That is above α/64 at α = 0.10 in some layer: calibrate on more tokens (a larger budget) for small α."))'''),
    ("md", '''\
## 12 · The model as a language model: held-out text of four domains

Token perplexity of the native router on held-out documents of four domains (encyclopedia,
biomedical, math, code; the `domains` task). The bundled tiny model was trained on these domains with
these documents held out, so here — unlike on WikiText, HellaSwag or LAMBADA — it is a language
model; for any other model it is plain text of four kinds.'''),
    ("code", '''\
from bh_routing import evaluation as ev, report
domain_result = ev.evaluate(model, tokenizer, "domains", max_length=min(1024, ev.resolve_max_length(model, tokenizer)))
domain_table = report.per_domain(domain_result)
nbs.display_markdown(nbs.markdown_table(domain_table, digits=4))
nbs.display_markdown(f"Native top-{sample.top_k}: token perplexity {domain_result.metrics['token_perplexity']:.4g} over "
                     f"{int(domain_table['tokens'].sum()):,} held-out tokens; by domain "
                     + ", ".join(f"{r.domain} {r.token_perplexity:.4g}" for r in domain_table.itertuples()) + ".")'''),
    ("md", "## 13 · Key observations (computed from this run)"),
    ("code", '''\
observations = nbs.describe_baseline(stats, conc, spec, sample.num_experts, sample.top_k, model_id=session.model_id)
nbs.display_markdown(observations)'''),
    ("md", EXPORT_MD),
    ("code", '''\
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
    "## Key observations", "\\n".join(f"- {line}" for line in observations),
    "## Per-layer statistics", nbs.markdown_table(stats, columns, digits=3),
    "## Weight concentration", nbs.markdown_table(table, digits=3),
    f"## Co-activation, layer {layer}", nbs.markdown_table(pairs, digits=3),
    "## Specialisation by text source", nbs.markdown_table(spec, digits=3), nbs.markdown_table(specific, digits=3),
    "## Held-out domain text (token perplexity)", nbs.markdown_table(domain_table, digits=4),
    "## Calibration", how, nbs.markdown_table(calibration_table, digits=3)], FIGURES)
archive = nbs.zip_folder(FOLDER)
print(f"{len(list(FOLDER.glob('*.png')))} figures, {len(list(FOLDER.glob('*.csv')))} CSV files -> {archive}")
print(f"notebook 01 took {session.elapsed:.0f} s")'''),
    ("code", '''\
print(nbs.offer_download(archive))  # a browser download on Colab; skipped elsewhere'''),
]

# --------------------------------------------------------------------------- notebook 02

NB02 = [
    ("md", f'''\
# 02 · Benjamini–Hochberg routing in OLMoE: a deep dive

{badge("02")}

Part 2 of the [bh_routing]({REPO_URL}) suite. Instead of a fixed top-8, **BH routing** lets each
token use as many experts as a false-discovery-rate test on the router's scores says it needs: for
p-values p₁…p₆₄, sort them, find the largest k with p₍ₖ₎ ≤ (k/64)·α, select those k (clamped to
[min_k, max_k]). Everything hinges on the p-values. Sections:

1. BH explained on one real token: sorted p-values against the (k/N)·α line
2. why naive p-values fail, on the model's own logits; the calibration's held-out quality per layer
   and expert
3. the four p-value models compared: α ↦ experts, per layer
4. a baseline test on 3 prompts
5. α sensitivity (8 values) and temperature where it means something: T of the `softmax` p-values
   and T of the mixing weights at a fixed selection (5 values each), with perplexity
6. token-level expert counts
7. a comparative analysis on 10 prompts: paired t-test, Wilcoxon, Cohen's d, 95 % CI (unit = prompt)
8. expert utilisation
9. the max_k × α grid and its four plots
10. patch vs analyze mode: analyze changes no output
11. interactive sliders: α and the mixing-weights temperature
12. a computed summary, and the results folder: `bh_routing_results.json`, `comparative_results.csv`,
    `RESULTS.md`, figures, a zip

It uses notebook 01's calibration when the results folder has it, and calibrates itself otherwise.

**What it costs** (defaults; estimates). On a free Colab **T4** with `allenai/OLMoE-1B-7B-0924` in
float16: ≈ 14 GiB of the T4's 15 GiB; 5–10 min to download and load the model, then ≈ 20–25 min —
the α/temperature/max_k sweep is 58 WikiText runs of ~41k tokens each (2.4 M tokens, ≈ 20 min at an
assumed ~2k tokens/s), the rest (calibration, prompts, diagnostics) a few minutes. The bundled tiny
model on CPU: a few minutes at the `demo` budget. The sweep is checkpointed: run again to resume.'''),
    ("code", PARAMETERS_COMMON + '''\
ALPHA = 0.05          # BH level for the single-configuration sections
PVALUES = "empirical"  # p-value model for them: "empirical" (default), "pooled", "zscore", "softmax"
INTERACTIVE = True    # sliders (ipywidgets) at the end; skipped where widgets are unavailable
''', ["parameters"]),
    ("md", SETUP_MD),
    ("code", SETUP_CODE.format(repo=REPO_URL, key="02")),
    ("code", LOAD_CODE + '''\
calibration, _, how = nbs.load_or_calibrate(session, model, tokenizer)
print("calibration:", how)
BH = {"strategy": "bh", "alpha": ALPHA, "pvalues": PVALUES, "max_k": 8}
NATIVE = {"strategy": "topk", "k": 8}
'''),
    ("md", '''\
## 1 · BH explained on one real token

The last token of a prompt, in the middle MoE layer. Its 64 p-values are sorted; BH selects every
expert up to the **last** rank where the sorted p-value is under the line (k/64)·α — even if some
earlier ones are above it (step-up). The router then clamps the count to [min_k, max_k] = [1, 8].'''),
    ("code", '''\
from bh_routing.data import prompt_set
baseline_prompts = prompt_set("baseline")
one = nbs.record_native_routing(model, tokenizer, {"prompt": [baseline_prompts[2]["prompt"]]}, progress=False)
layer = one.num_layers // 2
token = one.num_tokens - 1
explanation = nbs.bh_explain(one.logits[layer][token], layer, ALPHA, PVALUES, calibration)
''' + figure("bh_explained", 'nbs.plot_bh_explained(explanation, subtitle=f"{session.subtitle} · token {tokenizer.decode([int(one.token_ids[token])])!r}")',
             "BH on one token: sorted p-values against the critical line (k/N)·α.") + '''
nbs.display_markdown(explanation.markdown())
nbs.display_markdown(nbs.markdown_table(explanation.table.head(12), ["rank", "expert", "logit", "prob", "pvalue", "critical",
                                                                      "below_line", "bh", "selected", "native"], digits=3))
others = []
for model_name in ("softmax", "pooled", "empirical", "zscore"):
    e = nbs.bh_explain(one.logits[layer][token], layer, ALPHA, model_name, calibration)
    others.append({"pvalues": model_name, "smallest p": e.table["pvalue"].iloc[0], "α/N": ALPHA / one.num_experts,
                   "k*": e.k_star, "selected": e.k_selected, "router agrees": e.router_agrees})
one_token = pd.DataFrame(others)
nbs.display_markdown("The same token under each p-value model:\\n\\n" + nbs.markdown_table(one_token, digits=3))
assert one_token["router agrees"].all(), "the router's selection differs from the step-up table"'''),
    ("md", '''\
## 2 · Why naive p-values fail — on the model's own logits

Native routing recorded on held-out WikiText-2 text. For each p-value model: the smallest of a
token's 64 p-values (BH selects anything on its own only if it is ≤ α/64), the share of tokens
where that happens, what BH selects with no floor, and the `bh` strategy's mean experts and floor rate
(min_k = 1).'''),
    ("code", '''\
wikitext = nbs.text_sources(session.sample_tokens)["WikiText (encyclopedia)"]
eval_sample = nbs.record_native_routing(model, tokenizer, {"WikiText": wikitext},
                                        max_length=512, max_tokens_per_source=session.sample_tokens,
                                        batch_size=session.batch_size(512))
diagnostics, smallest = nbs.pvalue_diagnostics(eval_sample.logits, calibration, alpha=ALPHA)
''' + figure("naive_pvalues", "nbs.plot_smallest_pvalues(smallest, ALPHA, eval_sample.num_experts, session.subtitle)",
             "The smallest p-value per token under each p-value model, against α/N.") + '''
by_model = diagnostics.groupby("pvalues", sort=False)[["min_p_median", "reach_rate", "bh_k_raw", "mean_experts", "floor_rate"]].mean().reset_index()
nbs.display_markdown(nbs.markdown_table(by_model, digits=3))
row = by_model.set_index("pvalues")
naive_lines = [f"On {eval_sample.num_tokens:,} tokens × {eval_sample.num_layers} layers, α = {ALPHA} (α/N = {ALPHA / eval_sample.num_experts:.2g}):"]
if "softmax" in row.index:
    naive_lines.append(f"`softmax` (1 − probability): the smallest p-value has median {row.loc['softmax', 'min_p_median']:.3f}; "
                 f"{row.loc['softmax', 'reach_rate']:.1%} of tokens reach α/N, BH alone selects {row.loc['softmax', 'bh_k_raw']:.2f} "
                 f"experts and the strategy sits on its floor {row.loc['softmax', 'floor_rate']:.0%} of the time.")
for name in ("pooled", "zscore", "empirical"):
    if name in row.index:
        naive_lines.append(f"`{name}`: median smallest p {row.loc[name, 'min_p_median']:.2g}, {row.loc[name, 'reach_rate']:.1%} of tokens "
                     f"reach α/N, BH alone selects {row.loc[name, 'bh_k_raw']:.2f}, the strategy uses {row.loc[name, 'mean_experts']:.2f} "
                     f"experts (floor {row.loc[name, 'floor_rate']:.0%}).")
nbs.display_markdown(naive_lines)'''),
    ("md", '''\
### Calibration quality on held-out text

The calibrated p-values are valid per expert if held-out text is exchangeable with the calibration
text: on the held-out tokens above, an expert outside the native top-8 should get P(p ≤ q) ≤ q.
Per layer: KS distance from uniform, the worst excess F(q) − q, and P(p ≤ q)/q; then the experts
furthest above 1 (anti-conservative).'''),
    ("code", '''\
from bh_routing.validity import calibration_quality
quality_layers, quality_experts = calibration_quality(eval_sample.logits, calibration, "empirical")
nbs.display_markdown(nbs.markdown_table(quality_layers, digits=3))
nbs.display_markdown(nbs.markdown_table(quality_experts.groupby("layer").head(2), digits=3))
nbs.display_markdown(f"Per layer the null p-values are at most {quality_layers['ks_excess'].max():.3f} above uniform (KS); single "
                     f"experts range {quality_layers['expert_ratio_min@0.01'].min():.2f}–{quality_layers['expert_ratio_max@0.01'].max():.2f}"
                     f"× nominal at q = 0.01. Dividing α by the worst ratio is a conservative per-expert choice.")'''),
    ("md", '''\
## 3 · P-value models compared: the α ↦ experts map

What BH *would* select (analyze-equivalent: on the native logits above, so later layers see native
hidden states) for 8 values of α, per p-value model, averaged over layers — and per layer for the
chosen model. Strategies have to be compared at matched mean k (notebook 03), so this map matters.'''),
    ("code", '''\
ALPHAS = (0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.50)
curve = nbs.alpha_curve(nbs.subsample(eval_sample.logits, 4096, session.seed), calibration, ALPHAS)
''' + figure("pvalue_models_alpha", 'plots.plot_alpha_sensitivity(curve, metrics=("mean_experts", "floor_rate"), subtitle=session.subtitle)',
             "Mean experts and floor rate vs α per p-value model (recorded native logits).") + '''
''' + figure("alpha_by_layer", 'plots.plot_alpha_maxk_heatmap(curve[curve["pvalues"] == PVALUES], value="mean_experts", row="layer", col="alpha", subtitle=f"{session.subtitle} · {PVALUES} p-values")',
             "Mean experts per layer and α for the chosen p-value model.") + '''
reach = pd.concat([nbs.first_alpha_reaching(curve, k) for k in (2, 4)], ignore_index=True)
nbs.display_markdown(nbs.markdown_table(reach, digits=3))
nbs.display_markdown([f"`{r.pvalues}` reaches a mean of {r.target:g} experts " + (f"at α = {r.alpha:g}" if pd.notna(r.alpha) else
                      f"at no α ≤ {max(ALPHAS)} (at most {r.mean_experts:.2f})") for r in reach.itertuples()])'''),
    ("md", '''\
## 4 · Baseline test on 3 prompts

Each prompt teacher-forced under native top-8 and under BH (patch mode: the model really runs with
BH's experts), then continued greedily. `nll`: mean negative log-likelihood per prompt token.'''),
    ("code", '''\
native_base = nbs.score_prompts(model, tokenizer, baseline_prompts, NATIVE, label="native top-8", new_tokens=session.budget.new_tokens)
bh_base = nbs.score_prompts(model, tokenizer, baseline_prompts, BH, calibration, label=f"BH α={ALPHA}", new_tokens=session.budget.new_tokens)
baseline_test = native_base.table[["id", "n_tokens", "nll", "continuation"]].merge(
    bh_base.table[["id", "nll", "mean_experts", "floor_rate", "continuation"]], on="id", suffixes=("_native", "_bh"))
nbs.display_markdown(nbs.markdown_table(baseline_test, digits=3))
nbs.display_markdown([f"{r.id}: BH uses {r.mean_experts:.2f} experts per token and layer (floor {r.floor_rate:.0%}); "
                      f"NLL {r.nll_native:.3f} → {r.nll_bh:.3f} nats/token" for r in baseline_test.itertuples()])'''),
    ("md", '''\
## 5 · α sensitivity (8 values) and temperature sensitivity (7 values)

The deep-dive sweep, in patch mode on WikiText-2 (the budget's articles): native top-8; BH with each
p-value model at 8 values of α; BH on `softmax` p-values at 5 temperatures; BH (`empirical`, α = 0.05) with
the mixing weights at 5 temperatures; BH over max_k × α
(section 9) and top-k at k = 16, 32, 64. Each finished run is checkpointed in the results folder:
re-running resumes.'''),
    ("code", '''\
from bh_routing import experiments as ex, report
SWEEP = FOLDER / "sweep"
budget = session.budget
runs = ex.bh_deep_dive(budget) + [ex.Run(f"top-{k}", {"strategy": "topk", "k": k}, "wikitext", budget.n_for("wikitext"),
                                          max_length=budget.max_length, group="top-k by k") for k in (16, 32, 64)]
context = ex.SweepContext(model, tokenizer, session.model_id, calibration)
records = ex.run_sweep(context, runs, SWEEP, name="deep-dive")
sweep_report = report.build_report(SWEEP)
sweep_report.write(SWEEP)
table = sweep_report.runs
failed = table[table["status"] != "ok"]
print(f"{len(table) - len(failed)} runs ok, {len(failed)} failed" + ("".join(f"\\n  {r.label}: {r.error}" for r in failed.itertuples())))
ok = table[table["status"] == "ok"]
native_ppl = float(ok.loc[ok["label"] == "native top-8", "word_perplexity"].iloc[0])
alpha_runs = ok[ok["group"].str.startswith("alpha/")]
''' + figure("alpha_sensitivity", 'plots.plot_alpha_sensitivity(alpha_runs, metrics=("mean_experts", "word_perplexity"), subtitle=session.subtitle)',
             "α sensitivity (patch mode, WikiText): mean experts and word perplexity per p-value model.") + '''
pivot = alpha_runs.pivot_table(index="alpha", columns="pvalues", values=["mean_experts", "word_perplexity"])
pivot.columns = [f"{a} ({b})" for a, b in pivot.columns]
nbs.display_markdown(nbs.markdown_table(pivot.reset_index(), digits=4))
chosen = alpha_runs[alpha_runs["pvalues"] == PVALUES].sort_values("alpha")
if len(chosen):
    nbs.display_markdown(
        f"Native top-8 word perplexity: {native_ppl:.4g}. With `{PVALUES}` p-values, α from {chosen['alpha'].min():g} to "
        f"{chosen['alpha'].max():g} moves BH from {chosen['mean_experts'].iloc[0]:.2f} to {chosen['mean_experts'].iloc[-1]:.2f} "
        f"experts and perplexity from {chosen['word_perplexity'].iloc[0]:.4g} to {chosen['word_perplexity'].iloc[-1]:.4g}.")'''),
    ("code", '''\
# Calibrated p-values are ranks, so their selection is temperature-invariant (T != 1 is refused).
# T means something for softmax p-values (1 - softmax(logits / T)) and for the mixing weights.
temperature_runs = ok[ok["group"] == "temperature/softmax"].copy()
temperature_runs["temperature"] = temperature_runs["temperature"].astype(float)
weights_runs = ok[ok["group"] == "weights temperature"].copy()
weights_runs["weights_temperature"] = weights_runs["weights_temperature"].astype(float)
''' + figure("temperature_sensitivity", 'plots.plot_temperature_sensitivity(temperature_runs, metrics=("floor_rate", "word_perplexity"), hue=None, subtitle=f"{session.subtitle} · BH softmax α=0.05")',
             "BH on softmax p-values: share of tokens on the floor and word perplexity vs T.") + '''
''' + figure("weights_temperature", 'plots.plot_temperature_sensitivity(weights_runs, metrics=("mean_experts", "word_perplexity"), x="weights_temperature", hue=None, subtitle=f"{session.subtitle} · BH empirical α=0.05")',
             "Mixing-weights temperature at a fixed BH selection: mean experts and word perplexity.") + '''
t = temperature_runs.sort_values("temperature")
w = weights_runs.sort_values("weights_temperature")
nbs.display_markdown(nbs.markdown_table(t, ["temperature", "mean_experts", "floor_rate", "word_perplexity"], digits=4))
nbs.display_markdown(nbs.markdown_table(w, ["weights_temperature", "mean_experts", "word_perplexity"], digits=4))
if len(t) and len(w):
    nbs.display_markdown(
        f"Softmax p-values: BH selects at most one expert (two probabilities cannot both exceed 1 − 2α/N), so with min_k = 1 "
        f"every T routes to the top-1 expert ({t['mean_experts'].mean():.2f} experts); T only changes how often the test itself "
        f"selects it: floor rate {t['floor_rate'].iloc[0]:.0%} at T = {t['temperature'].iloc[0]:g}, {t['floor_rate'].iloc[-1]:.0%} at T = "
        f"{t['temperature'].iloc[-1]:g}. Mixing weights at T_w from {w['weights_temperature'].min():g} to {w['weights_temperature'].max():g}, "
        f"same selection ({w['mean_experts'].min():.2f}–{w['mean_experts'].max():.2f} experts): word perplexity "
        f"{w['word_perplexity'].iloc[0]:.4g} → {w['word_perplexity'].iloc[-1]:.4g} (native {native_ppl:.4g}).")'''),
    ("md", '''\
## 6 · Token-level expert counts

The complex baseline prompt under BH: experts per token (mean over layers, min–max bars) and per
token and layer.'''),
    ("code", '''\
prompt_id = baseline_prompts[2]["id"]
pieces, counts = bh_base.tokens[prompt_id], bh_base.counts[prompt_id]
''' + figure("token_expert_counts", 'plots.plot_token_experts(pieces, counts, min_k=bh_base.min_k, max_k=bh_base.max_k, subtitle=f"{session.subtitle} · BH α={ALPHA}")',
             "Experts per token under BH (mean over layers; bars: min-max).") + '''
''' + figure("token_layer_counts", 'nbs.plot_count_heatmap(pieces, counts, subtitle=f"{session.subtitle} · BH α={ALPHA}", max_k=bh_base.max_k)',
             "Experts per token and layer under BH.") + '''
per_token = counts.mean(axis=0)
nbs.display_markdown(f"Most experts: {pieces[int(per_token.argmax())]!r} ({per_token.max():.2f} per layer); fewest: "
                     f"{pieces[int(per_token.argmin())]!r} ({per_token.min():.2f}). Per layer the mean ranges "
                     f"{counts.mean(axis=1).min():.2f}–{counts.mean(axis=1).max():.2f}.")'''),
    ("md", '''\
## 7 · Comparative analysis on 10 prompts

Native top-8 vs BH on the ten comparison prompts, paired by prompt: mean experts per token and
layer (native's 8 is fixed by its configuration: shown, not tested), and NLL per token: paired
t-test, Wilcoxon signed-rank, Cohen's d_z with its CI, and the 95 % CI of the mean difference
(BH − native). Ten prompts are ten pairs: read the intervals, not just p.'''),
    ("code", '''\
comparison_prompts = prompt_set("comparison")
native_cmp = nbs.score_prompts(model, tokenizer, comparison_prompts, NATIVE, label="native top-8")
bh_cmp = nbs.score_prompts(model, tokenizer, comparison_prompts, BH, calibration, label=f"BH α={ALPHA}")
tests = nbs.compare_prompts(native_cmp, bh_cmp, metrics=("nll",))  # experts: native's 8 is fixed, nothing to test
nbs.display_markdown(nbs.markdown_table(tests, ["metric", "n", "mean_baseline", "mean_candidate", "mean_difference", "ci_low",
                                                "ci_high", "t_pvalue", "wilcoxon_pvalue", "cohens_dz", "dz_ci_low", "dz_ci_high", "notes"], digits=3))
comparative = native_cmp.table.merge(bh_cmp.table, on=["id", "category"], suffixes=("_native", "_bh"))
comparative.to_csv(FOLDER / "comparative_results.csv", index=False)
long = pd.concat([s.table.assign(label=s.label) for s in (native_cmp, bh_cmp)])
''' + figure("comparison_experts", 'plots.plot_paired_boxplots(long, value="mean_experts", unit="id", ylabel="experts per token and layer", subtitle=session.subtitle)',
             "Experts per token and layer on 10 prompts, native vs BH (lines join a prompt).") + '''
''' + figure("comparison_nll", 'plots.plot_paired_boxplots(long, value="nll", unit="id", ylabel="NLL per token (nats)", subtitle=session.subtitle)',
             "NLL per token on 10 prompts, native vs BH.") + '''
nll_test = tests.set_index("metric").loc["nll"]
''' + figure("comparison_nll_differences", 'plots.plot_difference_histogram(native_cmp.table["nll"], bh_cmp.table["nll"], unit="prompt", stats=analysis.paired_comparison(native_cmp.table["nll"], bh_cmp.table["nll"], unit="prompt"), xlabel="NLL per token: BH − native (nats)", subtitle=session.subtitle)',
             "Paired NLL differences per prompt (BH − native) with the 95 % CI of the mean.") + '''
k_bh, k_native = bh_cmp.table["mean_experts"], native_cmp.table["mean_experts"]
nbs.display_markdown(
    f"BH uses {k_bh.mean():.2f} experts per token and layer (prompts {k_bh.min():.2f}–{k_bh.max():.2f}) vs native "
    f"{k_native.mean():.0f}, which its configuration fixes (so no test). "
    f"NLL changes by {nll_test['mean_difference']:+.3g} nats/token (95 % CI {nll_test['ci_low']:+.3g} to {nll_test['ci_high']:+.3g}; "
    f"paired t p = {nll_test['t_pvalue']:.3g}, Wilcoxon p = {nll_test['wilcoxon_pvalue']:.3g}, d_z = {nll_test['cohens_dz']:.2f}).")'''),
    ("md", "## 8 · Expert utilisation: native vs BH (the 10 prompts)"),
    ("code", '''\
num_experts = model.config.num_experts
loads = {"native top-8": native_cmp.load(num_experts), f"BH α={ALPHA}": bh_cmp.load(num_experts)}
for name, load in loads.items():
    slug = "native" if name.startswith("native") else "bh"
''' + figure("utilisation_{slug}", 'plots.plot_expert_utilization(load, subtitle=f"{session.subtitle} · {name}")',
                    "Expert utilisation per layer (load relative to the layer mean).", indent="    ") + '''
balance = pd.DataFrame([{"routing": name, **{k: float(np.nanmean(v)) for k, v in analysis.load_metrics(load).items()}}
                        for name, load in loads.items()])
nbs.display_markdown(nbs.markdown_table(balance, ["routing", "cv", "gini", "max_mean_ratio", "entropy_normalised", "dead_experts"], digits=3))
nbs.display_markdown(f"Load CV (layer mean) {balance['cv'].iloc[0]:.2f} native vs {balance['cv'].iloc[1]:.2f} under BH; "
                     f"unused experts per layer {balance['dead_experts'].iloc[0]:.1f} vs {balance['dead_experts'].iloc[1]:.1f} on these prompts.")'''),
    ("md", '''\
## 9 · max_k ∈ {8, 16, 32, 64} × α ∈ {0.01, 0.05, 0.10}

Does BH want more than 8 experts when allowed? Mean experts and word perplexity over the grid, the
share of tokens at the ceiling, and BH against top-k at k = max_k.'''),
    ("code", '''\
grid = ok[ok["group"] == "alpha x max_k"].copy()
grid[["alpha", "max_k"]] = grid[["alpha", "max_k"]].astype(float)
topk = ok[ok["strategy"] == "topk"].copy()
topk["k"] = topk["k"].astype(float)
grid_table = grid.pivot_table(index="max_k", columns="alpha", values=["mean_experts", "ceiling_rate", "word_perplexity"])
grid_table.columns = [f"{metric} α={alpha:g}" for metric, alpha in grid_table.columns]
nbs.display_markdown(nbs.markdown_table(grid_table.reset_index(), digits=4))
grid.to_csv(FOLDER / "alpha_maxk_grid.csv", index=False)
''' + figure("maxk_alpha_experts", 'plots.plot_alpha_maxk_heatmap(grid, value="mean_experts", subtitle=session.subtitle)',
             "Mean experts over the α × max_k grid.") + '''
''' + figure("maxk_alpha_perplexity", 'plots.plot_alpha_maxk_heatmap(grid, value="word_perplexity", fmt=".4g", subtitle=session.subtitle)',
             "Word perplexity over the α × max_k grid.") + '''
''' + figure("maxk_saturation", 'plots.plot_saturation(grid, subtitle=session.subtitle)',
             "Saturation: mean experts and the share of tokens at max_k vs α, per max_k.") + '''
''' + figure("maxk_vs_topk", 'nbs.plot_maxk_lines(grid, "word_perplexity", topk=topk[topk["k"] >= 8], subtitle=session.subtitle, title="Word perplexity vs max_k: BH vs top-k")',
             "Word perplexity vs max_k per α, with top-k at k = max_k.") + '''
widest = grid[grid["max_k"] == grid["max_k"].max()].sort_values("alpha")
nbs.display_markdown(
    f"With max_k = {int(widest['max_k'].iloc[0]) if len(widest) else '–'}, BH uses " +
    ", ".join(f"{r.mean_experts:.2f} experts at α = {r.alpha:g} (ceiling {r.ceiling_rate:.0%})" for r in widest.itertuples()) +
    f"; at max_k = 8 the ceiling is hit by {grid[grid['max_k'] == 8]['ceiling_rate'].mean():.0%} of tokens on average.")'''),
    ("md", '''\
## 10 · Patch vs analyze mode

`mode="patch"` routes with the strategy; `mode="analyze"` runs the model natively and records what
the strategy *would* choose. Analyze must change no output — exactly — and leaving either patch
must restore the model exactly.'''),
    ("code", '''\
modes = nbs.patch_vs_analyze(model, tokenizer, comparison_prompts[0]["prompt"], BH, calibration)
nbs.display_markdown(nbs.markdown_table(pd.DataFrame([modes]), digits=3))
nbs.display_markdown(
    f"Analyze mode: max |Δ logits| = **{modes['max_abs_diff_analyze']:.1f}** (recording {modes['mean_experts_analyze']:.2f} experts "
    f"per token that BH would use); after both patches are removed: {modes['max_abs_diff_restored']:.1f}. Patch mode: max |Δ logits| = "
    f"{modes['max_abs_diff_patch']:.3g} with {modes['mean_experts_patch']:.2f} experts; next token "
    f"{'unchanged' if modes['same_next_token_patch'] else 'changed'}.")
assert modes["max_abs_diff_analyze"] == 0.0 and modes["max_abs_diff_restored"] == 0.0'''),
    ("md", '''\
## 11 · Interactive: re-route a prompt live

Move α (which experts) and the mixing-weights temperature T (how they are weighted; the selection
does not depend on it); the prompt is re-routed with BH (patch mode) and the experts per token and the
next-token predictions update. Needs `ipywidgets` (Colab has it); skipped elsewhere.'''),
    ("code", '''\
LIVE_PROMPT = comparison_prompts[5]["prompt"]
live_info = {}

def live(alpha=ALPHA, weights_temperature=1.0):
    try:
        fig, info = nbs.reroute(model, tokenizer, LIVE_PROMPT, calibration, alpha, weights_temperature, PVALUES,
                                subtitle=f"{session.subtitle} · BH {PVALUES} α={alpha:.3g} weights T={weights_temperature:g}")
    except ValueError as error:  # e.g. an α below what the calibration can resolve
        print(f"α = {alpha:.3g}, weights T = {weights_temperature:g}: {error}")
        return
    live_info.update(info)
    nbs.show(fig)
    nbs.display_markdown(f"{info['mean_experts']:.2f} experts per token and layer (floor {info['floor_rate']:.0%}); next token "
                         f"native {', '.join(info['next_native'][:3])} · BH {', '.join(info['next_bh'][:3])} · "
                         f"total variation {info['total_variation']:.3g}")

live()  # once with the parameters, so the output is there without widgets
try:
    import ipywidgets as widgets
except ImportError:
    widgets = None
if INTERACTIVE and widgets is not None:
    (alpha_low, alpha_high), (t_low, t_high) = nbs.LIVE_SLIDERS["alpha"], nbs.LIVE_SLIDERS["weights_temperature"]
    widgets.interact(live, alpha=widgets.FloatLogSlider(value=ALPHA, base=10, min=np.log10(alpha_low), max=np.log10(alpha_high),
                                                        step=0.1, description="α"),
                     weights_temperature=widgets.FloatSlider(value=1.0, min=t_low, max=t_high, step=0.25, description="weights T"))
else:
    print("sliders skipped: " + ("INTERACTIVE = False" if not INTERACTIVE else "ipywidgets is not installed"))'''),
    ("md", "## 12 · Summary (computed from this run)"),
    ("code", '''\
supported = [f for f in sweep_report.findings if f.is_finding]
tested = [f for f in sweep_report.findings if f.family_size]
summary_lines = [
    f"On one token (layer {explanation.layer}), BH with `{PVALUES}` p-values at α = {ALPHA} selects k* = {explanation.k_star} "
    f"(router: {explanation.k_selected}).",
    *naive_lines[1:],
    f"Baseline prompts under BH: {bh_base.table['mean_experts'].mean():.2f} experts per token and layer, NLL "
    f"{native_base.table['nll'].mean():.3f} → {bh_base.table['nll'].mean():.3f}.",
    f"10 prompts: BH {k_bh.mean():.2f} experts per token and layer (native: 8 by construction); paired NLL "
    f"{nll_test['mean_difference']:+.3g} nats/token (95 % CI {nll_test['ci_low']:+.3g} to {nll_test['ci_high']:+.3g}).",
    f"WikiText: native top-8 word perplexity {native_ppl:.4g}"
    + f"; {len(supported)} of {len(tested)} sweep configurations differ from it in paired tests after BH correction "
    "(which, and by how much: `sweep/REPORT.md`).",
    f"Analyze mode changed no logit (max |Δ| = {modes['max_abs_diff_analyze']:.1f}).",
]
nbs.display_markdown(summary_lines)'''),
    ("md", EXPORT_MD),
    ("code", '''\
results = {"session": session.describe(), "calibration": {"how": how, **calibration.metadata}, "alpha": ALPHA, "pvalues": PVALUES,
           "one_token": {"layer": explanation.layer, "k_star": explanation.k_star, "k_selected": explanation.k_selected,
                         "table": explanation.table.head(16).to_dict("records"), "all_models": one_token.to_dict("records")},
           "naive_pvalues": by_model.to_dict("records"), "calibration_quality": quality_layers.to_dict("records"),
           "worst_experts": quality_experts.to_dict("records"), "alpha_curve": curve.to_dict("records"),
           "baseline_test": baseline_test.to_dict("records"), "comparative_tests": tests.to_dict("records"),
           "expert_balance": balance.to_dict("records"), "patch_vs_analyze": modes,
           "sweep": {"folder": str(SWEEP), "runs": ok.drop(columns=["error"], errors="ignore").to_dict("records"), "failed": len(failed)},
           "summary": summary_lines, "seconds": round(session.elapsed, 1)}
nbs.write_json(FOLDER / "bh_routing_results.json", results)
curve.to_csv(FOLDER / "alpha_curve.csv", index=False)
nbs.write_report(FOLDER / "RESULTS.md", "BH routing deep dive (notebook 02)", session, [
    "## Summary", "\\n".join(f"- {line}" for line in summary_lines),
    "## BH on one token", explanation.markdown(), nbs.markdown_table(one_token, digits=3),
    "## Why naive p-values fail", nbs.markdown_table(by_model, digits=3),
    "## α needed per p-value model", nbs.markdown_table(reach, digits=3),
    "## Baseline test (3 prompts)", nbs.markdown_table(baseline_test, digits=3),
    "## α sensitivity (patch mode, WikiText)", nbs.markdown_table(pivot.reset_index(), digits=4),
    "## Calibration quality (held-out, per layer)", nbs.markdown_table(quality_layers, digits=3),
    "## Temperature: softmax p-values", nbs.markdown_table(t, ["temperature", "mean_experts", "floor_rate", "word_perplexity"], digits=4),
    "## Temperature: mixing weights (selection fixed)", nbs.markdown_table(w, ["weights_temperature", "mean_experts", "word_perplexity"], digits=4),
    "## Comparative analysis (10 prompts, unit = prompt)", nbs.markdown_table(tests, ["metric", "n", "mean_baseline", "mean_candidate",
        "mean_difference", "ci_low", "ci_high", "t_pvalue", "wilcoxon_pvalue", "cohens_dz"], digits=3),
    "## Expert balance", nbs.markdown_table(balance, digits=3),
    "## max_k × α", nbs.markdown_table(grid_table.reset_index(), digits=4),
    "## Patch vs analyze", nbs.markdown_table(pd.DataFrame([modes]), digits=3),
    f"The sweep's own report (all runs, paired tests against native top-8): `sweep/REPORT.md`."], FIGURES)
archive = nbs.zip_folder(FOLDER)
print(f"{len(list(FOLDER.glob('*.png')))} figures -> {archive}")
print(f"notebook 02 took {session.elapsed:.0f} s")'''),
    ("code", '''\
print(nbs.offer_download(archive))  # a browser download on Colab; skipped elsewhere'''),
]

# --------------------------------------------------------------------------- notebook 03

NB03 = [
    ("md", f'''\
# 03 · Full routing experiments: quality vs compute

{badge("03")}

Part 3 of the [bh_routing]({REPO_URL}) suite. The full-experiments preset: top-k, renormalised
top-k and uniform-weight top-k at k ∈ {{2, 4, 6, 8}}; BH (α = 0.05) with max_k ∈ {{2, 4, 6, 8, 16, 32,
64}} and α ∈ {{0.01, 0.10}}; top-p, threshold, ratio and entropy routing — each evaluated, in patch
mode, on held-out text of four domains (token perplexity per domain; the bundled tiny model's own
training domains, where it is a language model), WikiText-2 (word perplexity), HellaSwag (acc,
acc_norm) and LAMBADA (acc), the last three as lm-evaluation-harness defines them. Sections:

1. the plan and its cost
2. the sweep, checkpointed: a disconnect loses at most the run in progress
3. the report object and the comparison table → `REPORT.md`, `full_routing_results.csv`
4. quality-vs-mean-experts Pareto plots (descriptive)
5. paired comparisons against native top-8, BH-corrected over the report (`comparison.csv`)
6. **matched compute**: every adaptive strategy tuned to k̄ ∈ {{2, 4, 6, 8}} beside top-k at the
   same k (optional; on by default when cheap)
7. findings: only what the corrected paired tests support; accuracy tasks at chance say so
8. the results folder: figures, tables, a zip

**What it costs** (defaults; estimates). On a free Colab **T4** with `allenai/OLMoE-1B-7B-0924` in
float16: ≈ 14 GiB of the T4's 15 GiB. The default `colab` budget (WikiText 8 articles, HellaSwag
300, LAMBADA 300, max_length 1024) scores ~117k tokens per configuration; 102 runs plus 20
matched-compute runs are ~4.8 M tokens, **≈ 40 min at an assumed ~2k tokens/s**, on top of 5–10 min
to download and load the model — one free session. The notebook re-estimates from the speed it
measures on its first run. `BUDGET = "full"` (all 50 held-out WikiText articles, all 10,042
HellaSwag and 5,153 LAMBADA items, 4096-token context) is ~138 M tokens, **≈ 19 h** at that rate:
several sessions — set `DRIVE = True` so every finished run is on Google Drive and each session
resumes where the last one stopped.'''),
    ("code", PARAMETERS_COMMON + '''\
MATCHED = "auto"  # matched-compute section: True, False, or "auto" (on when it adds at most 35 % to the sweep)
TASKS = ("domains", "wikitext", "hellaswag", "lambada")  # domains: held-out text of the tiny model's training domains
''', ["parameters"]),
    ("md", SETUP_MD),
    ("code", SETUP_CODE.format(repo=REPO_URL, key="03")),
    ("code", LOAD_CODE + '''\
calibration, calibration_logits, how = nbs.load_or_calibrate(session, model, tokenizer, need_logits=True)
print("calibration:", how)
'''),
    ("md", '''\
## 1 · The plan and what it costs

Tokens are counted exactly, by building every run's requests as the evaluator will; the time is that
count divided by a throughput — the T4 assumption before anything ran, the measured speed after.'''),
    ("code", '''\
from bh_routing import experiments as ex, report
budget = session.budget
runs = ex.full_experiments(budget, TASKS)
main_estimate = nbs.estimate_sweep(runs, tokenizer, default_max_length=4096)
search_tokens = nbs.MATCHED_SEARCH_TOKENS[session.budget_name]
matched_probe = nbs.matched_runs_for_estimate(budget)  # what matched compute adds: 4 targets x 5 adaptive strategies, WikiText
matched_estimate = nbs.estimate_sweep(matched_probe, tokenizer, default_max_length=4096)
share = matched_estimate["tokens"].sum() / main_estimate["tokens"].sum()
use_matched = share <= 0.35 if MATCHED == "auto" else bool(MATCHED)
on_t4 = "T4" in session.environment.get("gpu", "")
rate = nbs.T4_TOKENS_PER_S
plan = pd.concat([main_estimate.assign(part="full preset"), matched_estimate.assign(part="matched compute")], ignore_index=True)
nbs.display_markdown(nbs.markdown_table(plan, ["part", "task", "runs", "tokens_per_run", "tokens", "seconds"], digits=3))
total = main_estimate["tokens"].sum() + (matched_estimate["tokens"].sum() if use_matched else 0)
nbs.display_markdown(
    f"{len(runs)} runs of the full preset" + (f" + {len(matched_probe)} matched-compute runs" if use_matched else "") +
    f": **{total / 1e6:.2f} M tokens**. At the assumed T4 rate of {rate:,.0f} tokens/s that is "
    f"**{nbs.format_duration(total / rate)}**{'' if on_t4 else ' on a T4 (this machine differs; the measured estimate follows the first run)'}. "
    f"Matched compute adds {share:.0%} → {'on' if use_matched else 'off'} (MATCHED = {MATCHED!r}).")'''),
    ("code", '''\
if use_matched:  # the knob (α, p, τ, β) that gives each target mean k on calibration text, found by bisection
    search_logits = [l.to(session.device) for l in nbs.subsample(calibration_logits, search_tokens, session.seed)]
    matched_runs = nbs.new_runs(runs, ex.matched_compute(budget, search_logits, calibration, tasks=("wikitext",)))
    knobs = pd.DataFrame([{"label": r.label, "target k̄": r.routing["calibrated"]["target_k"],
                           "achieved on calibration": r.routing["calibrated"]["achieved_k"],
                           r.routing["calibrated"]["knob"]: r.routing[r.routing["calibrated"]["knob"]]}
                          for r in matched_runs if "calibrated" in r.routing])
    nbs.display_markdown(nbs.markdown_table(knobs, digits=4))
else:
    matched_runs = []
all_runs = runs + matched_runs'''),
    ("md", '''\
## 2 · The sweep (checkpointed — re-run to resume)

Every finished run is appended to `results.jsonl` in the results folder at once; a run that fails
(out of memory, NaN) is recorded with its error and the sweep goes on. After a disconnect, run the
notebook again with the same parameters: finished runs are skipped. A representative mix of runs
(every task, several strategies) runs first, and the rest is estimated from the speed of that mix.'''),
    ("code", '''\
context = ex.SweepContext(model, tokenizer, session.model_id, calibration)
mix = nbs.representative_runs(all_runs)  # every task, several strategies: the cheapest run alone under-estimates
timed = ex.run_sweep(context, mix, FOLDER, name="full")
measured = nbs.measured_rate(timed, nbs.estimate_sweep(mix, tokenizer, default_max_length=4096))
if measured:
    remaining = nbs.estimate_sweep([r for r in all_runs if r not in mix], tokenizer, tokens_per_s=measured, default_max_length=4096)
    print(f"measured {measured:,.0f} tokens/s over a mix of {len(mix)} runs -> about "
          f"{nbs.format_duration(remaining['seconds'].sum())} for the remaining runs (finished runs are skipped)")
records = ex.run_sweep(context, all_runs, FOLDER, name="full")
failed = [r for r in records if r["status"] != "ok"]
print(f"{len(records) - len(failed)} runs ok, {len(failed)} failed" + "".join(f"\\n  {r['label']} ({r['task']}): {r['error']}" for r in failed))'''),
    ("md", '''\
## 3 · The report and the comparison table

`report.build_report` reads the sweep into one report object — runs, paired comparisons, findings,
figures — and `write` saves its tables, figures and `REPORT.md` in the results folder. Below, one row
per configuration: mean experts per token and layer (mean over the tasks; per task in the CSV), each
task's headline metric, and how often the count sits on its floor (min_k) or ceiling (max_k).'''),
    ("code", '''\
sweep_report = report.build_report(FOLDER)
sweep_report.write(FOLDER)
table = sweep_report.runs
comparison_table = nbs.comparison_table(table[table["target_k"].isna()])
comparison_table.to_csv(FOLDER / "full_routing_results.csv", index=False)
nbs.display_markdown(nbs.markdown_table(comparison_table, ["label", "strategy", "group", "mean_experts", *nbs.HEADLINE_COLUMNS,
                                                           "floor_rate", "ceiling_rate"], digits=4))'''),
    ("md", '''\
## 4 · Quality vs mean experts (descriptive)

The report's Pareto plots: point estimates; the staircase joins the configurations no other beats on
both axes. They describe this sample; which differences are real is for sections 5 and 7 to say.
Tasks at chance on this model get no plot.'''),
    ("code", '''\
for figure in sweep_report.figures:
    if figure.name.startswith("pareto_"):
        nbs.show(figure.figure)
        FIGURES.append((f"{figure.name}.png", figure.caption))'''),
    ("md", '''\
## 5 · Paired comparisons

Same items, same tokens: each configuration against native top-8 (and a compute-matched one also
against top-k at its k̄), by a paired test over items — paired t on per-item log-likelihoods
(WikiText articles, domain documents), exact McNemar on per-item correctness (HellaSwag, LAMBADA) —
with Benjamini–Hochberg correction over every comparison of the report. Effects are candidate −
reference with 95 % CIs. From the report's `comparison.csv`.'''),
    ("code", '''\
nbs.display_markdown(report.markdown_table(sweep_report.comparisons, ["task", "candidate", "reference", "candidate_k", "reference_k",
                                                                     "n", "test", "effect", "ci_low", "ci_high", "p_adjusted", "verdict"]))'''),
    ("md", '''\
## 6 · Matched compute

The fair comparison: each adaptive strategy at the knob that gives a target mean number of experts
k̄ on calibration text, beside top-k with k = k̄, on WikiText. A claim needs the k̄ achieved on the
evaluated text to match within the report's tolerance; the table and the figure are descriptive.'''),
    ("code", '''\
matched = nbs.matched_table(table) if use_matched else pd.DataFrame()
if len(matched):
    matched.to_csv(FOLDER / "matched_compute.csv", index=False)
    nbs.display_markdown(nbs.markdown_table(matched, digits=4))
    nbs.show(nbs.plot_matched_compute(matched, subtitle=session.subtitle), FOLDER / "matched_compute.png")
    FIGURES.append(("matched_compute.png", "Matched compute: each strategy at k̄ = 2, 4, 6, 8 beside top-k (descriptive)."))
    nbs.display_markdown([f.statement for f in sweep_report.findings if f.comparison.matched])
else:
    print("matched compute is off (MATCHED = False, or too expensive at this budget with MATCHED = 'auto')")'''),
    ("md", "## 7 · Findings (paired tests, corrected for the number of comparisons)"),
    ("code", '''\
nbs.display_markdown(sweep_report.findings_markdown())'''),
    ("md", EXPORT_MD + '''

`REPORT.md` is the sweep report (findings, every run, the paired comparisons, figures, the
configuration and versions); `runs.csv` has one row per run, `full_routing_results.csv` one per
configuration. The per-run token arrays (`runs/`) stay in the folder for resuming, not in the zip.'''),
    ("code", '''\
nbs.write_json(FOLDER / "notebook_summary.json", {"session": session.describe(), "calibration": {"how": how, **calibration.metadata},
                                                   "matched_compute": use_matched, "report": sweep_report.summary(),
                                                   "failed_runs": len(failed), "seconds": round(session.elapsed, 1)})
archive = nbs.zip_folder(FOLDER)
print(f"{len(list(FOLDER.glob('*.png')))} figures -> {archive}")
print(f"notebook 03 took {session.elapsed:.0f} s")'''),
    ("code", '''\
print(nbs.offer_download(archive))  # a browser download on Colab; skipped elsewhere'''),
]


NOTEBOOKS = {"01": NB01, "02": NB02, "03": NB03}


# --------------------------------------------------------------------------- building


def build(key: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": {"provenance": [], "gpuType": "T4", "toc_visible": True},
    }
    cells = []
    for index, spec in enumerate(NOTEBOOKS[key]):
        kind, source = spec[0], spec[1]
        tags = spec[2] if len(spec) > 2 else []
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        cell["id"] = f"nb{key}-{index:02d}"
        if tags:
            cell.metadata["tags"] = list(tags)
        cells.append(cell)
    nb.cells = cells
    nbformat.validate(nb)
    return nb


def render(key: str) -> str:
    return nbformat.writes(build(key)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed notebook differs from this script")
    parser.add_argument("--out", type=Path, default=NOTEBOOK_DIR)
    args = parser.parse_args(argv)
    stale = []
    for key, name in NAMES.items():
        path = args.out / f"{name}.ipynb"
        text = render(key)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if stale:
        print(f"out of date (run python scripts/make_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
