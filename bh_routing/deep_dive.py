"""Notebook 02's sections: each computes (with :mod:`bh_routing.bh_diagnostics`,
:mod:`bh_routing.validity`, the sweep's :class:`bh_routing.report.Report`), then shows its figures,
tables and readings through the notebook's :class:`bh_routing.session.Session` (which keeps them for
the report and the summary JSON). The ``describe_*`` functions are the readings: Markdown computed
from this run's numbers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from . import bh_diagnostics as bhd
from .prompts import compare_prompts
from .pvalues import PVALUE_MODELS


# =========================================================================== 1 · one token


@dataclass
class OneToken:
    """BH on the last token of a prompt in the middle layer, under every p-value model."""
    explanation: bhd.BhExplanation  # under the chosen p-value model
    by_model: pd.DataFrame  # one row per p-value model: smallest p, α/N, k*, selected, router agrees
    piece: str  # the token, decoded


def one_token(model, tokenizer, prompt: str, calibration, alpha: float, pvalues: str) -> OneToken:
    """Record native routing on ``prompt`` and explain BH on its last token in the middle layer;
    raises if the router's selection differs from the step-up table under any p-value model."""
    from .native_routing import record_native_routing
    sample = record_native_routing(model, tokenizer, {"prompt": [prompt]}, progress=False)
    layer, token = sample.num_layers // 2, sample.num_tokens - 1
    logits = sample.logits[layer][token]  # [N]
    explained = {name: bhd.bh_explain(logits, layer, alpha, name, calibration)
                 for name in dict.fromkeys([*PVALUE_MODELS, pvalues])}
    by_model = pd.DataFrame([{"pvalues": name, "smallest p": e.table["pvalue"].iloc[0],
                              "α/N": alpha / sample.num_experts, "k*": e.k_star, "selected": e.k_selected,
                              "router agrees": e.router_agrees} for name, e in explained.items()])
    if not by_model["router agrees"].all():
        raise AssertionError(f"the router's selection differs from the step-up table:\n{by_model}")
    return OneToken(explained[pvalues], by_model, tokenizer.decode([int(sample.token_ids[token])]))


EXPLAIN_COLUMNS = ["rank", "expert", "logit", "prob", "pvalue", "critical", "below_line", "bh", "selected",
                   "native"]


# =========================================================================== 2 · naive p-values


def naive_pvalues(router_logits, calibration, alpha: float) -> tuple[pd.DataFrame, dict]:
    """(per p-value model, averaged over layers: median smallest p, share reaching α/N, what BH
    alone selects, the strategy's mean experts and floor rate; {model: smallest p per token})."""
    diagnostics, smallest = bhd.pvalue_diagnostics(router_logits, calibration, alpha=alpha)
    columns = ["min_p_median", "reach_rate", "bh_k_raw", "mean_experts", "floor_rate"]
    return diagnostics.groupby("pvalues", sort=False)[columns].mean().reset_index(), smallest


def describe_naive(table: pd.DataFrame, alpha: float, num_tokens: int, num_layers: int,
                   num_experts: int) -> list[str]:
    """One sentence per p-value model of :func:`naive_pvalues`' table."""
    lines = [f"On {num_tokens:,} tokens × {num_layers} layers, α = {alpha} (α/N = {alpha / num_experts:.2g}):"]
    for r in table.itertuples():
        if r.pvalues == "softmax":
            lines.append(f"`softmax` (1 − probability): the smallest p-value has median {r.min_p_median:.3f}; "
                         f"{r.reach_rate:.1%} of tokens reach α/N, BH alone selects {r.bh_k_raw:.2f} experts "
                         f"and the strategy sits on its floor {r.floor_rate:.0%} of the time.")
        else:
            lines.append(f"`{r.pvalues}`: median smallest p {r.min_p_median:.2g}, {r.reach_rate:.1%} of tokens "
                         f"reach α/N, BH alone selects {r.bh_k_raw:.2f}, the strategy uses "
                         f"{r.mean_experts:.2f} experts (floor {r.floor_rate:.0%}).")
    return lines


def describe_quality(layers: pd.DataFrame) -> str:
    """:func:`bh_routing.validity.calibration_quality`'s per-layer table in one sentence."""
    return (f"Per layer the null p-values are at most {layers['ks_excess'].max():.3f} above uniform (KS); "
            f"single experts range {layers['expert_ratio_min@0.01'].min():.2f}–"
            f"{layers['expert_ratio_max@0.01'].max():.2f}× nominal at q = 0.01. Dividing α by the worst ratio "
            "is a conservative per-expert choice.")


# =========================================================================== 3 · α map


def alpha_reaching(curve: pd.DataFrame, targets: Sequence[float] = (2, 4),
                   value: str = "mean_experts") -> pd.DataFrame:
    """Per p-value model and target: the smallest α of the curve whose layer-mean ``value`` reaches
    the target (NaN when none does), and the value there (else the largest reached)."""
    means = curve.groupby(["pvalues", "alpha"], sort=True)[value].mean().reset_index()
    rows = []
    for target in targets:
        for name, frame in means.groupby("pvalues", sort=False):
            hit = frame[frame[value] >= target]
            rows.append({"pvalues": name, "target": target,
                         "alpha": float(hit["alpha"].iloc[0]) if len(hit) else np.nan,
                         value: float(hit[value].iloc[0]) if len(hit) else float(frame[value].max())})
    return pd.DataFrame(rows)


def describe_reach(reach: pd.DataFrame) -> list[str]:
    """:func:`alpha_reaching`'s rows as sentences."""
    return [f"`{r.pvalues}` reaches a mean of {r.target:g} experts "
            + (f"at α = {r.alpha:g}" if pd.notna(r.alpha) else f"at no α of the grid (at most {r.mean_experts:.2f})")
            for r in reach.itertuples()]


# =========================================================================== 4, 6, 7, 8 · prompts


def baseline_table(native, bh) -> pd.DataFrame:
    """The baseline prompts side by side: tokens, NLL and continuation under native and BH."""
    return native.table[["id", "n_tokens", "nll", "continuation"]].merge(
        bh.table[["id", "nll", "mean_experts", "floor_rate", "continuation"]], on="id", suffixes=("_native", "_bh"))


def describe_baseline(table: pd.DataFrame) -> list[str]:
    return [f"{r.id}: BH uses {r.mean_experts:.2f} experts per token and layer (floor {r.floor_rate:.0%}); "
            f"NLL {r.nll_native:.3f} → {r.nll_bh:.3f} nats/token" for r in table.itertuples()]


def describe_token_counts(pieces: Sequence[str], counts: np.ndarray) -> str:
    """``counts`` [L, T]: the tokens with the most and fewest experts and the per-layer range."""
    per_token = counts.mean(axis=0)
    return (f"Most experts: {pieces[int(per_token.argmax())]!r} ({per_token.max():.2f} per layer); fewest: "
            f"{pieces[int(per_token.argmin())]!r} ({per_token.min():.2f}). Per layer the mean ranges "
            f"{counts.mean(axis=1).min():.2f}–{counts.mean(axis=1).max():.2f}.")


COMPARISON_COLUMNS = ["metric", "n", "mean_baseline", "mean_candidate", "mean_difference", "ci_low", "ci_high",
                      "t_pvalue", "wilcoxon_pvalue", "cohens_dz", "dz_ci_low", "dz_ci_high", "notes"]


def describe_comparison(tests: pd.DataFrame, native, bh) -> str:
    """The paired NLL test of BH against native over prompts, with BH's experts (native's are fixed)."""
    nll = tests.set_index("metric").loc["nll"]
    k_bh, k_native = bh.table["mean_experts"], native.table["mean_experts"]
    return (f"BH uses {k_bh.mean():.2f} experts per token and layer (prompts {k_bh.min():.2f}–{k_bh.max():.2f}) "
            f"vs native {k_native.mean():.0f}, which its configuration fixes (so no test). NLL changes by "
            f"{nll['mean_difference']:+.3g} nats/token (95 % CI {nll['ci_low']:+.3g} to {nll['ci_high']:+.3g}; "
            f"paired t p = {nll['t_pvalue']:.3g}, Wilcoxon p = {nll['wilcoxon_pvalue']:.3g}, "
            f"d_z = {nll['cohens_dz']:.2f}, n = {int(nll['n'])} prompts).")


def expert_balance(loads: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """{routing: [L, N] assignments} -> per routing the layer means of the load metrics."""
    from .analysis import load_metrics
    return pd.DataFrame([{"routing": name, **{k: float(np.nanmean(v)) for k, v in load_metrics(load).items()}}
                         for name, load in loads.items()])


BALANCE_COLUMNS = ["routing", "cv", "gini", "max_mean_ratio", "entropy_normalised", "dead_experts"]


def describe_balance(balance: pd.DataFrame) -> str:
    a, b = balance.iloc[0], balance.iloc[1]
    return (f"Load CV (layer mean) {a['cv']:.2f} {a['routing']} vs {b['cv']:.2f} {b['routing']}; unused experts "
            f"per layer {a['dead_experts']:.1f} vs {b['dead_experts']:.1f} on these prompts.")


# =========================================================================== 5, 9 · the sweep


@dataclass
class SweepTables:
    """The deep-dive sweep's finished runs, by section: α per p-value model, T of softmax p-values,
    mixing-weights T, the α × max_k grid and top-k beyond 8 (numeric columns as floats)."""
    native_perplexity: float
    alpha: pd.DataFrame
    temperature: pd.DataFrame
    weights: pd.DataFrame
    grid: pd.DataFrame
    topk: pd.DataFrame
    failed: pd.DataFrame

    @classmethod
    def from_report(cls, report, pvalue_models: Sequence[str] = PVALUE_MODELS) -> "SweepTables":
        ok = report.runs[report.runs["status"] == "ok"]

        def group(name: str, *numeric: str, sort: str | None = None) -> pd.DataFrame:
            frame = ok[ok["group"] == name].copy() if isinstance(name, str) else ok[ok["group"].isin(name)].copy()
            for column in numeric:  # knobs come back from the JSON records as text
                frame[column] = frame[column].astype(float) if column in frame else np.nan
            return frame.sort_values(sort) if sort else frame
        topk = ok[ok["strategy"] == "topk"].copy()
        topk["k"] = topk["k"].astype(float)  # native top-8 and top-k at k = max_k
        return cls(native_perplexity=float(ok.loc[ok["native"], "word_perplexity"].iloc[0]),
                   alpha=group([f"alpha/{m}" for m in pvalue_models], "alpha", sort="alpha"),
                   temperature=group("temperature/softmax", "temperature", sort="temperature"),
                   weights=group("weights temperature", "weights_temperature", sort="weights_temperature"),
                   grid=group("alpha x max_k", "alpha", "max_k"), topk=topk[topk["k"] >= 8],
                   failed=report.runs[report.runs["status"] != "ok"])

    def alpha_table(self) -> pd.DataFrame:
        pivot = self.alpha.pivot_table(index="alpha", columns="pvalues", values=["mean_experts", "word_perplexity"])
        pivot.columns = [f"{metric} ({model})" for metric, model in pivot.columns]
        return pivot.reset_index()

    def grid_table(self) -> pd.DataFrame:
        pivot = self.grid.pivot_table(index="max_k", columns="alpha",
                                      values=["mean_experts", "ceiling_rate", "word_perplexity"])
        pivot.columns = [f"{metric} α={alpha:g}" for metric, alpha in pivot.columns]
        return pivot.reset_index()

    def describe_runs(self) -> str:
        return (f"{len(self.alpha) + len(self.temperature) + len(self.weights) + len(self.grid)} BH runs and "
                f"{len(self.topk)} top-k runs ok, {len(self.failed)} failed"
                + "".join(f"; {r.label}: {r.error}" for r in self.failed.itertuples()) + ".")

    def describe_alpha(self, pvalues: str) -> str:
        chosen = self.alpha[self.alpha["pvalues"] == pvalues]
        if chosen.empty:
            return f"Native top-8 word perplexity: {self.native_perplexity:.4g}."
        first, last = chosen.iloc[0], chosen.iloc[-1]
        return (f"Native top-8 word perplexity: {self.native_perplexity:.4g}. With `{pvalues}` p-values, α from "
                f"{first['alpha']:g} to {last['alpha']:g} moves BH from {first['mean_experts']:.2f} to "
                f"{last['mean_experts']:.2f} experts and perplexity from {first['word_perplexity']:.4g} to "
                f"{last['word_perplexity']:.4g}.")

    def describe_temperature(self) -> str:
        t, w = self.temperature, self.weights
        if t.empty or w.empty:
            return "No temperature runs finished."
        return (f"Softmax p-values: BH selects at most one expert (two probabilities cannot both exceed "
                f"1 − 2α/N), so with min_k = 1 every T routes to the top-1 expert ({t['mean_experts'].mean():.2f} "
                f"experts); T only changes how often the test itself selects it: floor rate "
                f"{t['floor_rate'].iloc[0]:.0%} at T = {t['temperature'].iloc[0]:g}, {t['floor_rate'].iloc[-1]:.0%} "
                f"at T = {t['temperature'].iloc[-1]:g}. Mixing weights at T_w from {w['weights_temperature'].min():g} "
                f"to {w['weights_temperature'].max():g}, same selection ({w['mean_experts'].min():.2f}–"
                f"{w['mean_experts'].max():.2f} experts): word perplexity {w['word_perplexity'].iloc[0]:.4g} → "
                f"{w['word_perplexity'].iloc[-1]:.4g} (native {self.native_perplexity:.4g}).")

    def describe_grid(self) -> str:
        if self.grid.empty:
            return "No α × max_k run finished."
        widest = self.grid[self.grid["max_k"] == self.grid["max_k"].max()].sort_values("alpha")
        at_8 = self.grid[self.grid["max_k"] == 8]["ceiling_rate"]
        return (f"With max_k = {int(widest['max_k'].iloc[0])}, BH uses "
                + ", ".join(f"{r.mean_experts:.2f} experts at α = {r.alpha:g} (ceiling {r.ceiling_rate:.0%})"
                            for r in widest.itertuples())
                + (f"; at max_k = 8 the ceiling is hit by {at_8.mean():.0%} of tokens on average." if len(at_8)
                   else "."))


TEMPERATURE_COLUMNS = ["temperature", "mean_experts", "floor_rate", "word_perplexity"]
WEIGHTS_COLUMNS = ["weights_temperature", "mean_experts", "word_perplexity"]


# =========================================================================== 10 · modes, summary


def describe_modes(modes: Mapping) -> str:
    """:func:`bh_routing.bh_diagnostics.patch_vs_analyze` in one sentence."""
    return (f"Analyze mode: max |Δ logits| = **{modes['max_abs_diff_analyze']:.1f}** (recording "
            f"{modes['mean_experts_analyze']:.2f} experts per token that BH would use); after both patches are "
            f"removed: {modes['max_abs_diff_restored']:.1f}. Patch mode: max |Δ logits| = "
            f"{modes['max_abs_diff_patch']:.3g} with {modes['mean_experts_patch']:.2f} experts; next token "
            f"{'unchanged' if modes['same_next_token_patch'] else 'changed'}.")


def show_summary(session, one: OneToken, naive: list[str], baseline: pd.DataFrame, tests: pd.DataFrame,
                 bh_prompts, sweep: SweepTables, report, modes: Mapping) -> list[str]:
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


def show_one_token(session, model, tokenizer, calibration, prompt: str, alpha: float, pvalues: str) -> OneToken:
    """Section 1: BH on one real token — the step-up figure, its table, every p-value model."""
    from .routing_plots import plot_bh_explained
    one = one_token(model, tokenizer, prompt, calibration, alpha, pvalues)
    session.figure(plot_bh_explained(one.explanation, subtitle=f"{session.subtitle} · token {one.piece!r}"),
                   "bh_explained", "BH on one token: sorted p-values against the critical line (k/N)·α.")
    session.say(one.explanation.markdown(), "BH on one token")
    session.table(one.explanation.table.head(12), columns=EXPLAIN_COLUMNS, digits=3)
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
    table, smallest = naive_pvalues(sample.logits, calibration, alpha)
    session.figure(plot_smallest_pvalues(smallest, alpha, sample.num_experts, session.subtitle), "naive_pvalues",
                   "The smallest p-value per token under each p-value model, against α/N.")
    session.table(table, "Why naive p-values fail", digits=3)
    lines = describe_naive(table, alpha, sample.num_tokens, sample.num_layers, sample.num_experts)
    session.say(lines)
    session.keep(naive_pvalues=table)
    return lines


def show_calibration_quality(session, sample, calibration) -> pd.DataFrame:
    """Section 2b: the calibrated null p-values on held-out text, per layer and worst experts."""
    from .validity import calibration_quality
    layers, experts = calibration_quality(sample.logits, calibration, "empirical")
    session.table(layers, "Calibration quality (held-out, per layer)", digits=3)
    session.table(experts.groupby("layer").head(2), digits=3)
    session.say(describe_quality(layers))
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
    reach = session.table(alpha_reaching(curve, targets=(2, 4)), "α needed per p-value model", digits=3)
    session.say(describe_reach(reach))
    session.keep(alpha_curve=curve)
    return curve


def show_baseline(session, native, bh) -> pd.DataFrame:
    """Section 4: the baseline prompts under native and BH."""
    table = session.table(baseline_table(native, bh), "Baseline test (3 prompts)", digits=3)
    session.say(describe_baseline(table))
    session.keep(baseline_test=table)
    return table


def show_sweep(session, folder, pvalue_models: Sequence[str]) -> tuple[SweepTables, object]:
    """Section 5: the deep-dive sweep's report (written to ``folder``) and its tables by section."""
    from .report import build_report
    report = build_report(folder)
    report.write(folder)  # the sweep's own REPORT.md: every run, paired tests against native top-8
    tables = SweepTables.from_report(report, pvalue_models)
    session.say(tables.describe_runs())
    session.keep(sweep={"folder": str(folder), "runs": report.runs.drop(columns=["error"], errors="ignore")
                        .to_dict("records"), "failed": len(tables.failed)})
    return tables, report


def show_alpha_sensitivity(session, sweep: SweepTables, pvalues: str) -> None:
    from .plots import plot_alpha_sensitivity
    session.figure(plot_alpha_sensitivity(sweep.alpha, metrics=("mean_experts", "word_perplexity"),
                                          subtitle=session.subtitle), "alpha_sensitivity",
                   "α sensitivity (patch mode, WikiText): mean experts and word perplexity per p-value model.")
    session.table(sweep.alpha_table(), "α sensitivity (patch mode, WikiText)", digits=4)
    session.say(sweep.describe_alpha(pvalues))


def show_temperatures(session, sweep: SweepTables, alpha: float) -> None:
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
    session.table(sweep.temperature, "Temperature: softmax p-values", TEMPERATURE_COLUMNS, digits=4)
    session.table(sweep.weights, "Temperature: mixing weights (selection fixed)", WEIGHTS_COLUMNS, digits=4)
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
    session.say(describe_token_counts(pieces, counts), "Token-level expert counts")


def show_comparison(session, native, bh) -> pd.DataFrame:
    """Section 7: BH vs native over prompts, paired by prompt: tests, CSV and three figures."""
    from .analysis import paired_comparison
    from .plots import plot_difference_histogram, plot_paired_boxplots
    tests = compare_prompts(native, bh, metrics=("nll",))  # native's 8 experts are fixed: nothing to test
    session.table(tests, f"Comparative analysis ({len(native.table)} prompts, unit = prompt)", COMPARISON_COLUMNS,
                  digits=3)
    session.say(describe_comparison(tests, native, bh))
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
    balance = session.table(expert_balance(loads), "Expert balance", BALANCE_COLUMNS, digits=3)
    session.say(describe_balance(balance))
    session.keep(expert_balance=balance)
    return balance


def show_max_k_grid(session, sweep: SweepTables) -> None:
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
    session.say(describe_modes(modes), "Patch vs analyze")
    session.keep(patch_vs_analyze=modes)
    if modes["max_abs_diff_analyze"] != 0.0 or modes["max_abs_diff_restored"] != 0.0:
        raise AssertionError(f"analyze mode or the restore changed the logits: {modes}")
    return modes
