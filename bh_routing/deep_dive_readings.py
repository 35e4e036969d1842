"""Notebook 02's readings and tables: pure functions of a run's numbers (no session, no display).
The ``describe_*`` functions turn them into Markdown; :mod:`bh_routing.deep_dive` shows them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from . import bh_diagnostics as bhd
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


# =========================================================================== 10 · modes


def describe_modes(modes: Mapping) -> str:
    """:func:`bh_routing.bh_diagnostics.patch_vs_analyze` in one sentence."""
    return (f"Analyze mode: max |Δ logits| = **{modes['max_abs_diff_analyze']:.1f}** (recording "
            f"{modes['mean_experts_analyze']:.2f} experts per token that BH would use); after both patches are "
            f"removed: {modes['max_abs_diff_restored']:.1f}. Patch mode: max |Δ logits| = "
            f"{modes['max_abs_diff_patch']:.3g} with {modes['mean_experts_patch']:.2f} experts; next token "
            f"{'unchanged' if modes['same_next_token_patch'] else 'changed'}.")
