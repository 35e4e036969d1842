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
# 4. a baseline test on 3 prompts
# 5. α sensitivity (8 values) and temperature where it means something: T of the `softmax` p-values
#    and T of the mixing weights at a fixed selection (5 values each), with perplexity
# 6. token-level expert counts
# 7. a comparative analysis on 10 prompts: paired t-test, Wilcoxon, Cohen's d, 95 % CI (unit = prompt)
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
MODEL = "auto"   # "auto": OLMoE-1B-7B on a GPU, the tiny bundled OLMoE on CPU; "tiny", hub id, folder
BUDGET = "auto"  # "auto": "colab" on a GPU, "demo" on CPU; or "smoke" (seconds), "demo", "colab", "full"
OUT = "auto"     # results root of 01-03; "auto": Drive (DRIVE), /content (Colab), results/notebooks
DRIVE = False    # Colab: results *and* the Hugging Face cache on Google Drive (survive reconnects)
SEED = 0
REPO_URL = "https://github.com/bh-routing/bh_routing"  # the install source when nothing is uploaded
INTERACTIVE = "auto"   # sliders at the end: "auto" = only where a person is looking (never headless)
ALPHA = 0.05           # BH level of the single-configuration sections
PVALUES = "empirical"  # their p-value model: "empirical", "pooled", "zscore", "softmax"
PVALUE_MODELS = ("softmax", "pooled", "empirical", "zscore")  # compared over ALPHAS
ALPHAS = (0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.50)     # α sensitivity (curve and sweep)
TEMPERATURES = (0.05, 0.1, 0.2, 0.5, 1.0)  # softmax p-values only: calibrated ones refuse T != 1
WEIGHTS_TEMPERATURES = (0.5, 0.75, 1.0, 1.5, 2.0)  # mixing weights at a fixed BH selection
GRID_ALPHAS, MAX_KS = (0.01, 0.05, 0.10), (8, 16, 32, 64)  # the α x max_k grid
TOPK_KS = (16, 32, 64)  # top-k beside BH's max_k
BASELINE_PROMPTS, COMPARISON_PROMPTS = "baseline", "comparison"  # prompt sets (bh_routing.data)

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
from bh_routing import analysis, experiments as ex, plots, report
from bh_routing import session as sessions, native_routing as native, bh_diagnostics as bhd
from bh_routing import routing_plots as rplots, notebook_support as nbs
from bh_routing.data import prompt_set
from bh_routing.validity import calibration_quality

session = sessions.start_session("02", model=MODEL, budget=BUDGET, out=OUT, seed=SEED, drive=DRIVE)
FOLDER = session.folder
display(session)

# %%
model, tokenizer = session.load_model()  # prints the memory plan it checked
calibration, _, how = sessions.load_or_calibrate(session, model, tokenizer)
print("calibration:", how)
BH = {"strategy": "bh", "alpha": ALPHA, "pvalues": PVALUES, "max_k": 8}
NATIVE = {"strategy": "topk", "k": 8}

# %% [markdown]
# ## 1 · BH explained on one real token
#
# The last token of a prompt, in the middle MoE layer. Its 64 p-values are sorted; BH selects every
# expert up to the **last** rank where the sorted p-value is under the line (k/64)·α — even if some
# earlier ones are above it (step-up). The router then clamps the count to [min_k, max_k] = [1, 8].

# %%
baseline_prompts = prompt_set(BASELINE_PROMPTS)
one = native.record_native_routing(model, tokenizer, {"prompt": [baseline_prompts[2]["prompt"]]}, progress=False)
layer = one.num_layers // 2
token = one.num_tokens - 1
explanation = bhd.bh_explain(one.logits[layer][token], layer, ALPHA, PVALUES, calibration)
session.figure(rplots.plot_bh_explained(explanation, subtitle=f"{session.subtitle} · token {tokenizer.decode([int(one.token_ids[token])])!r}"), "bh_explained",
               "BH on one token: sorted p-values against the critical line (k/N)·α.")
nbs.display_markdown(explanation.markdown())
nbs.display_markdown(nbs.markdown_table(explanation.table.head(12), ["rank", "expert", "logit", "prob", "pvalue", "critical",
                                                                      "below_line", "bh", "selected", "native"], digits=3))
others = []
for model_name in ("softmax", "pooled", "empirical", "zscore"):
    e = bhd.bh_explain(one.logits[layer][token], layer, ALPHA, model_name, calibration)
    others.append({"pvalues": model_name, "smallest p": e.table["pvalue"].iloc[0], "α/N": ALPHA / one.num_experts,
                   "k*": e.k_star, "selected": e.k_selected, "router agrees": e.router_agrees})
one_token = pd.DataFrame(others)
nbs.display_markdown("The same token under each p-value model:\n\n" + nbs.markdown_table(one_token, digits=3))
assert one_token["router agrees"].all(), "the router's selection differs from the step-up table"

# %% [markdown]
# ## 2 · Why naive p-values fail — on the model's own logits
#
# Native routing recorded on held-out WikiText-2 text. For each p-value model: the smallest of a
# token's 64 p-values (BH selects anything on its own only if it is ≤ α/64), the share of tokens
# where that happens, what BH selects with no floor, and the `bh` strategy's mean experts and floor rate
# (min_k = 1).

# %%
wikitext = native.text_sources(session.sample_tokens)["WikiText (encyclopedia)"]
eval_sample = native.record_native_routing(model, tokenizer, {"WikiText": wikitext},
                                        max_length=512, max_tokens_per_source=session.sample_tokens,
                                        batch_size=session.batch_size(512))
diagnostics, smallest = bhd.pvalue_diagnostics(eval_sample.logits, calibration, alpha=ALPHA)
session.figure(rplots.plot_smallest_pvalues(smallest, ALPHA, eval_sample.num_experts, session.subtitle), "naive_pvalues",
               "The smallest p-value per token under each p-value model, against α/N.")
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
nbs.display_markdown(naive_lines)

# %% [markdown]
# ### Calibration quality on held-out text
#
# The calibrated p-values are valid per expert if held-out text is exchangeable with the calibration
# text: on the held-out tokens above, an expert outside the native top-8 should get P(p ≤ q) ≤ q.
# Per layer: KS distance from uniform, the worst excess F(q) − q, and P(p ≤ q)/q; then the experts
# furthest above 1 (anti-conservative).

# %%
quality_layers, quality_experts = calibration_quality(eval_sample.logits, calibration, "empirical")
nbs.display_markdown(nbs.markdown_table(quality_layers, digits=3))
nbs.display_markdown(nbs.markdown_table(quality_experts.groupby("layer").head(2), digits=3))
nbs.display_markdown(f"Per layer the null p-values are at most {quality_layers['ks_excess'].max():.3f} above uniform (KS); single "
                     f"experts range {quality_layers['expert_ratio_min@0.01'].min():.2f}–{quality_layers['expert_ratio_max@0.01'].max():.2f}"
                     f"× nominal at q = 0.01. Dividing α by the worst ratio is a conservative per-expert choice.")

# %% [markdown]
# ## 3 · P-value models compared: the α ↦ experts map
#
# What BH *would* select (analyze-equivalent: on the native logits above, so later layers see native
# hidden states) for 8 values of α, per p-value model, averaged over layers — and per layer for the
# chosen model. Strategies have to be compared at matched mean k (notebook 03), so this map matters.

# %%
curve = bhd.alpha_curve(bhd.subsample(eval_sample.logits, 4096, session.seed), calibration, ALPHAS,
                        models=PVALUE_MODELS)
session.figure(plots.plot_alpha_sensitivity(curve, metrics=("mean_experts", "floor_rate"), subtitle=session.subtitle), "pvalue_models_alpha",
               "Mean experts and floor rate vs α per p-value model (recorded native logits).")
session.figure(plots.plot_alpha_maxk_heatmap(curve[curve["pvalues"] == PVALUES], value="mean_experts", row="layer", col="alpha", subtitle=f"{session.subtitle} · {PVALUES} p-values"), "alpha_by_layer",
               "Mean experts per layer and α for the chosen p-value model.")
reach = pd.concat([nbs.first_alpha_reaching(curve, k) for k in (2, 4)], ignore_index=True)
nbs.display_markdown(nbs.markdown_table(reach, digits=3))
nbs.display_markdown([f"`{r.pvalues}` reaches a mean of {r.target:g} experts " + (f"at α = {r.alpha:g}" if pd.notna(r.alpha) else
                      f"at no α ≤ {max(ALPHAS)} (at most {r.mean_experts:.2f})") for r in reach.itertuples()])

# %% [markdown]
# ## 4 · Baseline test on 3 prompts
#
# Each prompt teacher-forced under native top-8 and under BH (patch mode: the model really runs with
# BH's experts), then continued greedily. `nll`: mean negative log-likelihood per prompt token.

# %%
native_base = bhd.score_prompts(model, tokenizer, baseline_prompts, NATIVE, label="native top-8", new_tokens=session.budget.new_tokens)
bh_base = bhd.score_prompts(model, tokenizer, baseline_prompts, BH, calibration, label=f"BH α={ALPHA}", new_tokens=session.budget.new_tokens)
baseline_test = native_base.table[["id", "n_tokens", "nll", "continuation"]].merge(
    bh_base.table[["id", "nll", "mean_experts", "floor_rate", "continuation"]], on="id", suffixes=("_native", "_bh"))
nbs.display_markdown(nbs.markdown_table(baseline_test, digits=3))
nbs.display_markdown([f"{r.id}: BH uses {r.mean_experts:.2f} experts per token and layer (floor {r.floor_rate:.0%}); "
                      f"NLL {r.nll_native:.3f} → {r.nll_bh:.3f} nats/token" for r in baseline_test.itertuples()])

# %% [markdown]
# ## 5 · α sensitivity (8 values) and temperature sensitivity (7 values)
#
# The deep-dive sweep, in patch mode on WikiText-2 (the budget's articles): native top-8; BH with each
# p-value model at 8 values of α; BH on `softmax` p-values at 5 temperatures; BH (`empirical`, α = 0.05) with
# the mixing weights at 5 temperatures; BH over max_k × α
# (section 9) and top-k at k = 16, 32, 64. Each finished run is checkpointed in the results folder:
# re-running resumes.

# %%
SWEEP = FOLDER / "sweep"
runs = ex.bh_deep_dive(session.budget, alphas=ALPHAS, pvalues=PVALUE_MODELS, temperatures=TEMPERATURES,
                       weights_temperatures=WEIGHTS_TEMPERATURES, grid_alphas=GRID_ALPHAS,
                       max_ks=MAX_KS, topk_ks=TOPK_KS)
context = ex.SweepContext(model, tokenizer, session.model_id, calibration)
records = ex.run_sweep(context, runs, SWEEP, name="deep-dive")
sweep_report = report.build_report(SWEEP)
sweep_report.write(SWEEP)
table = sweep_report.runs
failed = table[table["status"] != "ok"]
print(f"{len(table) - len(failed)} runs ok, {len(failed)} failed" + ("".join(f"\n  {r.label}: {r.error}" for r in failed.itertuples())))
ok = table[table["status"] == "ok"]
native_ppl = float(ok.loc[ok["native"], "word_perplexity"].iloc[0])
alpha_runs = ok[ok["group"].isin([f"alpha/{model}" for model in PVALUE_MODELS])]
session.figure(plots.plot_alpha_sensitivity(alpha_runs, metrics=("mean_experts", "word_perplexity"), subtitle=session.subtitle), "alpha_sensitivity",
               "α sensitivity (patch mode, WikiText): mean experts and word perplexity per p-value model.")
pivot = alpha_runs.pivot_table(index="alpha", columns="pvalues", values=["mean_experts", "word_perplexity"])
pivot.columns = [f"{a} ({b})" for a, b in pivot.columns]
nbs.display_markdown(nbs.markdown_table(pivot.reset_index(), digits=4))
chosen = alpha_runs[alpha_runs["pvalues"] == PVALUES].sort_values("alpha")
if len(chosen):
    nbs.display_markdown(
        f"Native top-8 word perplexity: {native_ppl:.4g}. With `{PVALUES}` p-values, α from {chosen['alpha'].min():g} to "
        f"{chosen['alpha'].max():g} moves BH from {chosen['mean_experts'].iloc[0]:.2f} to {chosen['mean_experts'].iloc[-1]:.2f} "
        f"experts and perplexity from {chosen['word_perplexity'].iloc[0]:.4g} to {chosen['word_perplexity'].iloc[-1]:.4g}.")

# %%
# Calibrated p-values are ranks, so their selection is temperature-invariant (T != 1 is refused).
# T means something for softmax p-values (1 - softmax(logits / T)) and for the mixing weights.
temperature_runs = ok[ok["group"] == "temperature/softmax"].copy()
temperature_runs["temperature"] = temperature_runs["temperature"].astype(float)
weights_runs = ok[ok["group"] == "weights temperature"].copy()
weights_runs["weights_temperature"] = weights_runs["weights_temperature"].astype(float)
session.figure(plots.plot_temperature_sensitivity(temperature_runs, metrics=("floor_rate", "word_perplexity"), hue=None, subtitle=f"{session.subtitle} · BH softmax α=0.05"), "temperature_sensitivity",
               "BH on softmax p-values: share of tokens on the floor and word perplexity vs T.")
session.figure(plots.plot_temperature_sensitivity(weights_runs, metrics=("mean_experts", "word_perplexity"), x="weights_temperature", hue=None, subtitle=f"{session.subtitle} · BH empirical α=0.05"), "weights_temperature",
               "Mixing-weights temperature at a fixed BH selection: mean experts and word perplexity.")
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
        f"{w['word_perplexity'].iloc[0]:.4g} → {w['word_perplexity'].iloc[-1]:.4g} (native {native_ppl:.4g}).")

# %% [markdown]
# ## 6 · Token-level expert counts
#
# The complex baseline prompt under BH: experts per token (mean over layers, min–max bars) and per
# token and layer.

# %%
prompt_id = baseline_prompts[2]["id"]
pieces, counts = bh_base.tokens[prompt_id], bh_base.counts[prompt_id]
session.figure(plots.plot_token_experts(pieces, counts, min_k=bh_base.min_k, max_k=bh_base.max_k, subtitle=f"{session.subtitle} · BH α={ALPHA}"), "token_expert_counts",
               "Experts per token under BH (mean over layers; bars: min-max).")
session.figure(rplots.plot_count_heatmap(pieces, counts, subtitle=f"{session.subtitle} · BH α={ALPHA}", max_k=bh_base.max_k), "token_layer_counts",
               "Experts per token and layer under BH.")
per_token = counts.mean(axis=0)
nbs.display_markdown(f"Most experts: {pieces[int(per_token.argmax())]!r} ({per_token.max():.2f} per layer); fewest: "
                     f"{pieces[int(per_token.argmin())]!r} ({per_token.min():.2f}). Per layer the mean ranges "
                     f"{counts.mean(axis=1).min():.2f}–{counts.mean(axis=1).max():.2f}.")

# %% [markdown]
# ## 7 · Comparative analysis on 10 prompts
#
# Native top-8 vs BH on the ten comparison prompts, paired by prompt: mean experts per token and
# layer (native's 8 is fixed by its configuration: shown, not tested), and NLL per token: paired
# t-test, Wilcoxon signed-rank, Cohen's d_z with its CI, and the 95 % CI of the mean difference
# (BH − native). Ten prompts are ten pairs: read the intervals, not just p.

# %%
comparison_prompts = prompt_set(COMPARISON_PROMPTS)
native_cmp = bhd.score_prompts(model, tokenizer, comparison_prompts, NATIVE, label="native top-8")
bh_cmp = bhd.score_prompts(model, tokenizer, comparison_prompts, BH, calibration, label=f"BH α={ALPHA}")
tests = bhd.compare_prompts(native_cmp, bh_cmp, metrics=("nll",))  # experts: native's 8 is fixed, nothing to test
nbs.display_markdown(nbs.markdown_table(tests, ["metric", "n", "mean_baseline", "mean_candidate", "mean_difference", "ci_low",
                                                "ci_high", "t_pvalue", "wilcoxon_pvalue", "cohens_dz", "dz_ci_low", "dz_ci_high", "notes"], digits=3))
comparative = native_cmp.table.merge(bh_cmp.table, on=["id", "category"], suffixes=("_native", "_bh"))
comparative.to_csv(FOLDER / "comparative_results.csv", index=False)
long = pd.concat([s.table.assign(label=s.label) for s in (native_cmp, bh_cmp)])
session.figure(plots.plot_paired_boxplots(long, value="mean_experts", unit="id", ylabel="experts per token and layer", subtitle=session.subtitle), "comparison_experts",
               "Experts per token and layer on 10 prompts, native vs BH (lines join a prompt).")
session.figure(plots.plot_paired_boxplots(long, value="nll", unit="id", ylabel="NLL per token (nats)", subtitle=session.subtitle), "comparison_nll",
               "NLL per token on 10 prompts, native vs BH.")
nll_test = tests.set_index("metric").loc["nll"]
session.figure(plots.plot_difference_histogram(native_cmp.table["nll"], bh_cmp.table["nll"], unit="prompt", stats=analysis.paired_comparison(native_cmp.table["nll"], bh_cmp.table["nll"], unit="prompt"), xlabel="NLL per token: BH − native (nats)", subtitle=session.subtitle), "comparison_nll_differences",
               "Paired NLL differences per prompt (BH − native) with the 95 % CI of the mean.")
k_bh, k_native = bh_cmp.table["mean_experts"], native_cmp.table["mean_experts"]
nbs.display_markdown(
    f"BH uses {k_bh.mean():.2f} experts per token and layer (prompts {k_bh.min():.2f}–{k_bh.max():.2f}) vs native "
    f"{k_native.mean():.0f}, which its configuration fixes (so no test). "
    f"NLL changes by {nll_test['mean_difference']:+.3g} nats/token (95 % CI {nll_test['ci_low']:+.3g} to {nll_test['ci_high']:+.3g}; "
    f"paired t p = {nll_test['t_pvalue']:.3g}, Wilcoxon p = {nll_test['wilcoxon_pvalue']:.3g}, d_z = {nll_test['cohens_dz']:.2f}).")

# %% [markdown]
# ## 8 · Expert utilisation: native vs BH (the 10 prompts)

# %%
num_experts = model.config.num_experts
loads = {"native top-8": native_cmp.load(num_experts), f"BH α={ALPHA}": bh_cmp.load(num_experts)}
for name, load in loads.items():
    slug = "native" if name.startswith("native") else "bh"
    session.figure(plots.plot_expert_utilization(load, subtitle=f"{session.subtitle} · {name}"), f"utilisation_{slug}",
                   "Expert utilisation per layer (load relative to the layer mean).")
balance = pd.DataFrame([{"routing": name, **{k: float(np.nanmean(v)) for k, v in analysis.load_metrics(load).items()}}
                        for name, load in loads.items()])
nbs.display_markdown(nbs.markdown_table(balance, ["routing", "cv", "gini", "max_mean_ratio", "entropy_normalised", "dead_experts"], digits=3))
nbs.display_markdown(f"Load CV (layer mean) {balance['cv'].iloc[0]:.2f} native vs {balance['cv'].iloc[1]:.2f} under BH; "
                     f"unused experts per layer {balance['dead_experts'].iloc[0]:.1f} vs {balance['dead_experts'].iloc[1]:.1f} on these prompts.")

# %% [markdown]
# ## 9 · max_k ∈ {8, 16, 32, 64} × α ∈ {0.01, 0.05, 0.10}
#
# Does BH want more than 8 experts when allowed? Mean experts and word perplexity over the grid, the
# share of tokens at the ceiling, and BH against top-k at k = max_k.

# %%
grid = ok[ok["group"] == "alpha x max_k"].copy()
grid[["alpha", "max_k"]] = grid[["alpha", "max_k"]].astype(float)
topk = ok[ok["strategy"] == "topk"].copy()
topk["k"] = topk["k"].astype(float)
grid_table = grid.pivot_table(index="max_k", columns="alpha", values=["mean_experts", "ceiling_rate", "word_perplexity"])
grid_table.columns = [f"{metric} α={alpha:g}" for metric, alpha in grid_table.columns]
nbs.display_markdown(nbs.markdown_table(grid_table.reset_index(), digits=4))
grid.to_csv(FOLDER / "alpha_maxk_grid.csv", index=False)
session.figure(plots.plot_alpha_maxk_heatmap(grid, value="mean_experts", subtitle=session.subtitle), "maxk_alpha_experts",
               "Mean experts over the α × max_k grid.")
session.figure(plots.plot_alpha_maxk_heatmap(grid, value="word_perplexity", fmt=".4g", subtitle=session.subtitle), "maxk_alpha_perplexity",
               "Word perplexity over the α × max_k grid.")
session.figure(plots.plot_saturation(grid, subtitle=session.subtitle), "maxk_saturation",
               "Saturation: mean experts and the share of tokens at max_k vs α, per max_k.")
session.figure(rplots.plot_maxk_lines(grid, "word_perplexity", topk=topk[topk["k"] >= 8], subtitle=session.subtitle, title="Word perplexity vs max_k: BH vs top-k"), "maxk_vs_topk",
               "Word perplexity vs max_k per α, with top-k at k = max_k.")
widest = grid[grid["max_k"] == grid["max_k"].max()].sort_values("alpha")
nbs.display_markdown(
    f"With max_k = {int(widest['max_k'].iloc[0]) if len(widest) else '–'}, BH uses " +
    ", ".join(f"{r.mean_experts:.2f} experts at α = {r.alpha:g} (ceiling {r.ceiling_rate:.0%})" for r in widest.itertuples()) +
    f"; at max_k = 8 the ceiling is hit by {grid[grid['max_k'] == 8]['ceiling_rate'].mean():.0%} of tokens on average.")

# %% [markdown]
# ## 10 · Patch vs analyze mode
#
# `mode="patch"` routes with the strategy; `mode="analyze"` runs the model natively and records what
# the strategy *would* choose. Analyze must change no output — exactly — and leaving either patch
# must restore the model exactly.

# %%
modes = bhd.patch_vs_analyze(model, tokenizer, comparison_prompts[0]["prompt"], BH, calibration)
nbs.display_markdown(nbs.markdown_table(pd.DataFrame([modes]), digits=3))
nbs.display_markdown(
    f"Analyze mode: max |Δ logits| = **{modes['max_abs_diff_analyze']:.1f}** (recording {modes['mean_experts_analyze']:.2f} experts "
    f"per token that BH would use); after both patches are removed: {modes['max_abs_diff_restored']:.1f}. Patch mode: max |Δ logits| = "
    f"{modes['max_abs_diff_patch']:.3g} with {modes['mean_experts_patch']:.2f} experts; next token "
    f"{'unchanged' if modes['same_next_token_patch'] else 'changed'}.")
assert modes["max_abs_diff_analyze"] == 0.0 and modes["max_abs_diff_restored"] == 0.0

# %% [markdown]
# ## 11 · Interactive: re-route a prompt live
#
# Move α (which experts) and the mixing-weights temperature T (how they are weighted; the selection
# does not depend on it); the prompt is re-routed with BH (patch mode) and the experts per token and the
# next-token predictions update. Needs `ipywidgets` (Colab has it) and a live front end:
# with `INTERACTIVE = "auto"` the sliders never appear in headless runs (papermill, nbclient).

# %%
LIVE_PROMPT = comparison_prompts[5]["prompt"]
live_info = {}

def live(alpha=ALPHA, weights_temperature=1.0):
    try:
        fig, info = bhd.reroute(model, tokenizer, LIVE_PROMPT, calibration, alpha, weights_temperature, PVALUES,
                                subtitle=f"{session.subtitle} · BH {PVALUES} α={alpha:.3g} weights T={weights_temperature:g}")
    except ValueError as error:  # e.g. an α below what the calibration can resolve
        print(f"α = {alpha:.3g}, weights T = {weights_temperature:g}: {error}")
        return
    live_info.update(info)
    sessions.show(fig)
    nbs.display_markdown(f"{info['mean_experts']:.2f} experts per token and layer (floor {info['floor_rate']:.0%}); next token "
                         f"native {', '.join(info['next_native'][:3])} · BH {', '.join(info['next_bh'][:3])} · "
                         f"total variation {info['total_variation']:.3g}")

live()  # once with the parameters, so the output is there without widgets
if runtime.interactive(INTERACTIVE):  # "auto": a person's front end with ipywidgets, never headless
    import ipywidgets as widgets
    (alpha_low, alpha_high), (t_low, t_high) = bhd.LIVE_SLIDERS["alpha"], bhd.LIVE_SLIDERS["weights_temperature"]
    widgets.interact(live, alpha=widgets.FloatLogSlider(value=ALPHA, base=10, min=np.log10(alpha_low),
                                                        max=np.log10(alpha_high), step=0.1, description="α"),
                     weights_temperature=widgets.FloatSlider(value=1.0, min=t_low, max=t_high, step=0.25,
                                                             description="weights T"))
else:
    print(f"sliders skipped (INTERACTIVE = {INTERACTIVE!r}: no live front end with ipywidgets here)")

# %% [markdown]
# ## 12 · Summary (computed from this run)

# %%
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
nbs.display_markdown(summary_lines)

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
    "## Summary", "\n".join(f"- {line}" for line in summary_lines),
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
    f"The sweep's own report (all runs, paired tests against native top-8): `sweep/REPORT.md`."])
archive = nbs.zip_folder(FOLDER)
print(f"{len(list(FOLDER.glob('*.png')))} figures -> {archive}")
print(f"notebook 02 took {session.elapsed:.0f} s")

# %%
print(nbs.offer_download(archive))  # a browser download on Colab; skipped elsewhere
