"""Notebook 02's sections: each computes (with :mod:`bh_routing.bh_diagnostics`,
:mod:`bh_routing.validity`, the sweep's :class:`bh_routing.report.Report`), then shows its figures,
tables and readings through the notebook's :class:`bh_routing.session.Session` (which keeps them for
the report and the summary JSON). The readings they show (Markdown computed from this run's numbers)
and the tables behind them are in :mod:`bh_routing.deep_dive_readings`."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from . import bh_diagnostics as bhd
from . import deep_dive_readings as readings
from .prompts import compare_prompts


# =========================================================================== summary


def show_summary(session, one: readings.OneToken, naive: list[str], baseline: pd.DataFrame, tests: pd.DataFrame,
                 bh_prompts, sweep: readings.SweepTables, report, modes: Mapping) -> list[str]:
    """Section 12, the computed summary: one line per section that produced a number."""
    e = one.explanation
    nll = tests.set_index("metric").loc["nll"]
    findings = [f for f in report.findings if f.is_finding]
    tested = [f for f in report.findings if f.family_size]
    lines = [f"On one token (layer {e.layer}), BH with `{e.pvalues}` p-values at α = {e.alpha} selects "
             f"k* = {e.k_star} (router: {e.k_selected}).",
             *naive[1:],
             f"Baseline prompts under BH: {baseline['mean_experts'].mean():.2f} experts per token and layer, NLL "
             f"{baseline['nll_native'].mean():.3f} → {baseline['nll_bh'].mean():.3f}.",
             f"{int(nll['n'])} prompts: BH {bh_prompts.table['mean_experts'].mean():.2f} experts per token and layer "
             f"(native: 8 by construction); paired NLL {nll['mean_difference']:+.3g} nats/token (95 % CI "
             f"{nll['ci_low']:+.3g} to {nll['ci_high']:+.3g}).",
             f"WikiText: native top-8 word perplexity {sweep.native_perplexity:.4g}; {len(findings)} of {len(tested)} "
             "sweep configurations differ from it in paired tests after BH correction (which, and by how much: "
             "`sweep/REPORT.md`).",
             f"Analyze mode changed no logit (max |Δ| = {modes['max_abs_diff_analyze']:.1f})."]
    session.say(lines, "Summary", lead=True)
    session.keep(summary=lines)
    return lines


# =========================================================================== 11 · live sliders


def live_sliders(model, tokenizer, prompt: str, calibration, alpha: float, pvalues: str, subtitle: str,
                 interactive: bool | str = "auto") -> dict:
    """Re-route ``prompt`` with BH at ``alpha`` (shown once), then — only where a person's front end
    with ipywidgets is attached (``interactive``, see :func:`bh_routing.runtime.interactive`) — sliders
    for α and the mixing-weights temperature. Returns the last re-routing's summary."""
    from . import runtime
    from .notebook_support import display_markdown
    from .session import show
    last: dict = {}

    def live(alpha=alpha, weights_temperature=1.0):
        try:
            fig, info = bhd.reroute(model, tokenizer, prompt, calibration, alpha, weights_temperature, pvalues,
                                    subtitle=f"{subtitle} · BH {pvalues} α={alpha:.3g} weights T={weights_temperature:g}")
        except ValueError as error:  # e.g. an α below what the calibration can resolve
            print(f"α = {alpha:.3g}, weights T = {weights_temperature:g}: {error}")
            return
        last.update(info)
        show(fig)
        display_markdown(f"{info['mean_experts']:.2f} experts per token and layer (floor {info['floor_rate']:.0%}); "
                         f"next token native {', '.join(info['next_native'][:3])} · BH "
                         f"{', '.join(info['next_bh'][:3])} · total variation {info['total_variation']:.3g}")
    live()  # once with the parameters, so the output is there without widgets
    if not runtime.interactive(interactive):
        print(f"sliders skipped (INTERACTIVE = {interactive!r}: no live front end with ipywidgets here)")
        return last
    import ipywidgets as widgets
    (alpha_low, alpha_high), (t_low, t_high) = bhd.LIVE_SLIDERS["alpha"], bhd.LIVE_SLIDERS["weights_temperature"]
    widgets.interact(live, alpha=widgets.FloatLogSlider(value=alpha, base=10, min=np.log10(alpha_low),
                                                        max=np.log10(alpha_high), step=0.1, description="α"),
                     weights_temperature=widgets.FloatSlider(value=1.0, min=t_low, max=t_high, step=0.25,
                                                             description="weights T"))
    return last


# =========================================================================== the sections


def show_one_token(session, model, tokenizer, calibration, prompt: str, alpha: float,
                   pvalues: str) -> readings.OneToken:
    """Section 1: BH on one real token — the step-up figure, its table, every p-value model."""
    from .routing_plots import plot_bh_explained
    one = readings.one_token(model, tokenizer, prompt, calibration, alpha, pvalues)
    session.figure(plot_bh_explained(one.explanation, subtitle=f"{session.subtitle} · token {one.piece!r}"),
                   "bh_explained", "BH on one token: sorted p-values against the critical line (k/N)·α.")
    session.say(one.explanation.markdown(), "BH on one token")
    session.table(one.explanation.table.head(12), columns=readings.EXPLAIN_COLUMNS, digits=3)
    session.table(one.by_model, "The same token under each p-value model", digits=3)
    session.keep(one_token={"layer": one.explanation.layer, "k_star": one.explanation.k_star,
                            "k_selected": one.explanation.k_selected,
                            "table": one.explanation.table.head(16).to_dict("records"),
                            "all_models": one.by_model.to_dict("records")})
    return one


def held_out_routing(session, model, tokenizer):
    """Native routing recorded on held-out WikiText-2 text (the budget's sample size)."""
    from .native_routing import record_native_routing, text_sources
    wikitext = text_sources(session.sample_tokens)["WikiText (encyclopedia)"]
    return record_native_routing(model, tokenizer, {"WikiText": wikitext}, max_length=512,
                                 max_tokens_per_source=session.sample_tokens, batch_size=session.batch_size(512))


def show_naive_pvalues(session, sample, calibration, alpha: float) -> list[str]:
    """Section 2: the smallest p-value per token under each model, and what BH makes of it."""
    from .routing_plots import plot_smallest_pvalues
    table, smallest = readings.naive_pvalues(sample.logits, calibration, alpha)
    session.figure(plot_smallest_pvalues(smallest, alpha, sample.num_experts, session.subtitle), "naive_pvalues",
                   "The smallest p-value per token under each p-value model, against α/N.")
    session.table(table, "Why naive p-values fail", digits=3)
    lines = readings.describe_naive(table, alpha, sample.num_tokens, sample.num_layers, sample.num_experts)
    session.say(lines)
    session.keep(naive_pvalues=table)
    return lines


def show_calibration_quality(session, sample, calibration) -> pd.DataFrame:
    """Section 2b: the calibrated null p-values on held-out text, per layer and worst experts."""
    from .validity import calibration_quality
    layers, experts = calibration_quality(sample.logits, calibration, "empirical")
    session.table(layers, "Calibration quality (held-out, per layer)", digits=3)
    session.table(experts.groupby("layer").head(2), digits=3)
    session.say(readings.describe_quality(layers))
    session.keep(calibration_quality=layers, worst_experts=experts)
    return layers


def show_alpha_map(session, sample, calibration, alphas: Sequence[float], models: Sequence[str],
                   pvalues: str) -> pd.DataFrame:
    """Section 3: what BH would select over ``alphas`` per p-value model (analyze-equivalent, on
    the recorded native logits), and per layer for ``pvalues``."""
    from .plots import plot_alpha_maxk_heatmap, plot_alpha_sensitivity
    curve = bhd.alpha_curve(bhd.subsample(sample.logits, 4096, session.seed), calibration, alphas, models=models)
    curve.to_csv(session.folder / "alpha_curve.csv", index=False)
    session.figure(plot_alpha_sensitivity(curve, metrics=("mean_experts", "floor_rate"), subtitle=session.subtitle),
                   "pvalue_models_alpha", "Mean experts and floor rate vs α per p-value model (native logits).")
    session.figure(plot_alpha_maxk_heatmap(curve[curve["pvalues"] == pvalues], value="mean_experts", row="layer",
                                           col="alpha", subtitle=f"{session.subtitle} · {pvalues} p-values"),
                   "alpha_by_layer", "Mean experts per layer and α for the chosen p-value model.")
    reach = session.table(readings.alpha_reaching(curve, targets=(2, 4)), "α needed per p-value model", digits=3)
    session.say(readings.describe_reach(reach))
    session.keep(alpha_curve=curve)
    return curve


def show_baseline(session, native, bh) -> pd.DataFrame:
    """Section 4: the baseline prompts under native and BH."""
    table = session.table(readings.baseline_table(native, bh), "Baseline test (3 prompts)", digits=3)
    session.say(readings.describe_baseline(table))
    session.keep(baseline_test=table)
    return table


def show_sweep(session, folder, pvalue_models: Sequence[str]) -> tuple[readings.SweepTables, object]:
    """Section 5: the deep-dive sweep's report (written to ``folder``) and its tables by section."""
    from .report import build_report
    report = build_report(folder)
    report.write(folder)  # the sweep's own REPORT.md: every run, paired tests against native top-8
    tables = readings.SweepTables.from_report(report, pvalue_models)
    session.say(tables.describe_runs())
    session.keep(sweep={"folder": str(folder), "runs": report.runs.drop(columns=["error"], errors="ignore")
                        .to_dict("records"), "failed": len(tables.failed)})
    return tables, report


def show_alpha_sensitivity(session, sweep: readings.SweepTables, pvalues: str) -> None:
    from .plots import plot_alpha_sensitivity
    session.figure(plot_alpha_sensitivity(sweep.alpha, metrics=("mean_experts", "word_perplexity"),
                                          subtitle=session.subtitle), "alpha_sensitivity",
                   "α sensitivity (patch mode, WikiText): mean experts and word perplexity per p-value model.")
    session.table(sweep.alpha_table(), "α sensitivity (patch mode, WikiText)", digits=4)
    session.say(sweep.describe_alpha(pvalues))


def show_temperatures(session, sweep: readings.SweepTables, alpha: float) -> None:
    """Section 5b: T of softmax p-values (floor rate), and the mixing weights' T at a fixed selection."""
    from .plots import plot_temperature_sensitivity
    session.figure(plot_temperature_sensitivity(sweep.temperature, metrics=("floor_rate", "word_perplexity"),
                                                hue=None, subtitle=f"{session.subtitle} · BH softmax α={alpha}"),
                   "temperature_sensitivity", "BH on softmax p-values: floor rate and word perplexity vs T.")
    session.figure(plot_temperature_sensitivity(sweep.weights, metrics=("mean_experts", "word_perplexity"),
                                                x="weights_temperature", hue=None,
                                                subtitle=f"{session.subtitle} · BH empirical α={alpha}"),
                   "weights_temperature", "Mixing-weights temperature at a fixed BH selection: mean experts "
                   "and word perplexity.")
    session.table(sweep.temperature, "Temperature: softmax p-values", readings.TEMPERATURE_COLUMNS, digits=4)
    session.table(sweep.weights, "Temperature: mixing weights (selection fixed)", readings.WEIGHTS_COLUMNS, digits=4)
    session.say(sweep.describe_temperature())


def show_token_counts(session, scores, prompt_id: str) -> None:
    """Section 6: experts per token of one prompt (mean over layers, and per layer)."""
    from .routing_plots import plot_token_experts
    from .routing_plots import plot_count_heatmap
    pieces, counts = scores.tokens[prompt_id], scores.counts[prompt_id]  # counts [L, T]
    subtitle = f"{session.subtitle} · {scores.label}"
    session.figure(plot_token_experts(pieces, counts, min_k=scores.min_k, max_k=scores.max_k, subtitle=subtitle),
                   "token_expert_counts", "Experts per token under BH (mean over layers; bars: min-max).")
    session.figure(plot_count_heatmap(pieces, counts, subtitle=subtitle, max_k=scores.max_k), "token_layer_counts",
                   "Experts per token and layer under BH.")
    session.say(readings.describe_token_counts(pieces, counts), "Token-level expert counts")


def show_comparison(session, native, bh) -> pd.DataFrame:
    """Section 7: BH vs native over prompts, paired by prompt: tests, CSV and three figures."""
    from .analysis import paired_comparison
    from .plots import plot_difference_histogram, plot_paired_boxplots
    tests = compare_prompts(native, bh, metrics=("nll",))  # native's 8 experts are fixed: nothing to test
    session.table(tests, f"Comparative analysis ({len(native.table)} prompts, unit = prompt)",
                  readings.COMPARISON_COLUMNS, digits=3)
    session.say(readings.describe_comparison(tests, native, bh))
    session.keep(comparative_tests=tests)
    native.table.merge(bh.table, on=["id", "category"], suffixes=("_native", "_bh")).to_csv(
        session.folder / "comparative_results.csv", index=False)
    long = pd.concat([s.table.assign(label=s.label) for s in (native, bh)])
    for value, ylabel, name in (("mean_experts", "experts per token and layer", "comparison_experts"),
                                ("nll", "NLL per token (nats)", "comparison_nll")):
        session.figure(plot_paired_boxplots(long, value=value, unit="id", ylabel=ylabel, subtitle=session.subtitle),
                       name, f"{ylabel[0].upper()}{ylabel[1:]} per prompt, native vs BH (lines join a prompt).")
    stats = paired_comparison(native.table["nll"], bh.table["nll"], unit="prompt")
    session.figure(plot_difference_histogram(native.table["nll"], bh.table["nll"], unit="prompt", stats=stats,
                                             xlabel="NLL per token: BH − native (nats)", subtitle=session.subtitle),
                   "comparison_nll_differences", "Paired NLL differences per prompt (BH − native) with the 95 % "
                   "CI of the mean.")
    return tests


def show_utilisation(session, native, bh, num_experts: int) -> pd.DataFrame:
    """Section 8: per-expert load under native and BH on the same prompts."""
    from .routing_plots import plot_expert_utilization
    loads = {native.label: native.load(num_experts), bh.label: bh.load(num_experts)}  # [L, N] each
    for (name, load), slug in zip(loads.items(), ("native", "bh")):
        session.figure(plot_expert_utilization(load, subtitle=f"{session.subtitle} · {name}"), f"utilisation_{slug}",
                       "Expert utilisation per layer (load relative to the layer mean).")
    balance = session.table(readings.expert_balance(loads), "Expert balance", readings.BALANCE_COLUMNS, digits=3)
    session.say(readings.describe_balance(balance))
    session.keep(expert_balance=balance)
    return balance


def show_max_k_grid(session, sweep: readings.SweepTables) -> None:
    """Section 9: the α × max_k grid: table, CSV, heatmaps, saturation, BH vs top-k at k = max_k."""
    from .plots import plot_alpha_maxk_heatmap, plot_saturation
    from .routing_plots import plot_maxk_lines
    session.table(sweep.grid_table(), "max_k × α", digits=4)
    sweep.grid.to_csv(session.folder / "alpha_maxk_grid.csv", index=False)
    for value, fmt, name, what in (("mean_experts", ".2f", "maxk_alpha_experts", "Mean experts"),
                                   ("word_perplexity", ".4g", "maxk_alpha_perplexity", "Word perplexity")):
        session.figure(plot_alpha_maxk_heatmap(sweep.grid, value=value, fmt=fmt, subtitle=session.subtitle), name,
                       f"{what} over the α × max_k grid.")
    session.figure(plot_saturation(sweep.grid, subtitle=session.subtitle), "maxk_saturation",
                   "Saturation: mean experts and the share of tokens at max_k vs α, per max_k.")
    session.figure(plot_maxk_lines(sweep.grid, "word_perplexity", topk=sweep.topk, subtitle=session.subtitle,
                                   title="Word perplexity vs max_k: BH vs top-k"), "maxk_vs_topk",
                   "Word perplexity vs max_k per α, with top-k at k = max_k.")
    session.say(sweep.describe_grid())


def show_patch_vs_analyze(session, model, tokenizer, prompt: str, config: Mapping, calibration) -> dict:
    """Section 10: analyze mode must change no output, and removing either patch restores the model;
    raises if not."""
    modes = bhd.patch_vs_analyze(model, tokenizer, prompt, config, calibration)
    session.say(readings.describe_modes(modes), "Patch vs analyze")
    session.keep(patch_vs_analyze=modes)
    if modes["max_abs_diff_analyze"] != 0.0 or modes["max_abs_diff_restored"] != 0.0:
        raise AssertionError(f"analyze mode or the restore changed the logits: {modes}")
    return modes
