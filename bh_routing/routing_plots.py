"""Figures of the router and of BH's diagnostics (notebooks 01-03), in :mod:`bh_routing.plots`'s
style: ``matplotlib.figure.Figure`` built without pyplot, every axis labelled, ``subtitle`` as the
title's second line."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure

from . import plots
from .plots import _figure, _legend_outside, _style, _title, _width, label_for  # one style for every figure of the package
from .native_routing import RoutingSample, _entropy_nats
from .bh_diagnostics import BhExplanation

_FAMILY_STYLE = {"top-k": ("topk", "--"), "BH empirical": ("bh", "-"), "BH zscore": ("by", "-"), "top_p": ("top_p", "-"),
                 "threshold": ("threshold", "-"), "ratio": ("ratio", "-")}


def plot_matched_compute(matched: pd.DataFrame, metric: str = "word_perplexity", subtitle: str | None = None):
    """Quality against the achieved mean experts for each strategy family at the matched targets
    (one line per family through k̄ = 2, 4, 6, 8), top-k dashed: below the dashed line is better at
    the same compute."""
    with _style():
        fig, axes = _figure(width=6.4, height=4.6)
        ax = axes[0, 0]
        for family, rows in matched.groupby("family", sort=False):
            strategy, line = _FAMILY_STYLE.get(family, (family, "-"))
            color, marker = plots.strategy_style(strategy)
            rows = rows.sort_values("mean_experts")
            ax.plot(rows["mean_experts"], rows[metric], ls=line, marker=marker, color=color, label=family,
                    lw=1.8 if family == "top-k" else 1.2, ms=7 if family == "top-k" else 5, zorder=3 if family == "top-k" else 2)
        ax.set_xlabel("mean active experts per token per layer (achieved)")
        ax.set_ylabel(plots.label_for(metric))
        _legend_outside(ax)
        return _title(fig, f"Matched compute: {metric.replace('_', ' ')} at k̄ = "
                           + ", ".join(plots.knob(k) for k in sorted(matched["target_k"].unique())), subtitle)


# =========================================================================== figures


def plot_logit_distributions(sample: RoutingSample, subtitle: str | None = None, max_points: int = 20000, seed: int = 0):
    """Per layer: box plots of all router logits and of each token's top-1 logit (left); the
    distribution of the top-1 probability with the uniform 1/N marked (right)."""
    rng = np.random.default_rng(seed)
    with _style():
        fig, axes = _figure(2, width=5.6)
        ax = axes[0, 0]
        layers = np.arange(sample.num_layers)
        every = [l.flatten().numpy() for l in sample.logits]
        every = [v if v.size <= max_points else rng.choice(v, max_points, replace=False) for v in every]
        top1 = [l.max(dim=1).values.numpy() for l in sample.logits]
        ax.boxplot(every, positions=layers - 0.18, widths=0.3, showfliers=False, patch_artist=True,
                   boxprops=dict(facecolor="#c6dbef"), medianprops=dict(color="#08519c"))
        ax.boxplot(top1, positions=layers + 0.18, widths=0.3, showfliers=False, patch_artist=True,
                   boxprops=dict(facecolor="#fcbba1"), medianprops=dict(color="#a50f15"))
        ax.set_xticks(layers, [str(l) for l in layers])
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("router logit")
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(facecolor="#c6dbef", label="all experts"), Patch(facecolor="#fcbba1", label="top-1 expert")],
                  fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
        ax = axes[0, 1]
        colors = sns.color_palette("viridis", sample.num_layers)
        tops = [torch.softmax(logits, dim=-1).max(dim=1).values.numpy() for logits in sample.logits]
        high = float(max(np.quantile(t, 0.995) for t in tops))
        bins = np.linspace(0, min(1.0, max(high * 1.05, 2.0 / sample.num_experts)), 41)
        for layer, top in enumerate(tops):
            ax.hist(np.clip(top, 0, bins[-1]), bins=bins, histtype="step", density=True, color=colors[layer],
                    label=f"layer {layer}")
        ax.axvline(1 / sample.num_experts, ls="--", color="0.3", lw=1, label=f"uniform 1/{sample.num_experts}")
        ax.set_xlabel("top-1 routing probability (largest mixing weight)")
        ax.set_ylabel("density")
        _legend_outside(ax, ncol=2 if sample.num_layers > 6 else 1)
        return _title(fig, "Router logits and top-1 probability per layer", subtitle)


def plot_entropy_across_layers(sample: RoutingSample, subtitle: str | None = None):
    """Normalised routing entropy per layer (median, inter-quartile and 5–95 % bands) and the mean
    top-1 probability, against the uniform router."""
    entropy = [(_entropy_nats(torch.softmax(l.double(), -1)) / math.log(sample.num_experts)).numpy() for l in sample.logits]
    layers = np.arange(sample.num_layers)
    q = np.array([np.quantile(e, [0.05, 0.25, 0.5, 0.75, 0.95]) for e in entropy])
    with _style():
        fig, axes = _figure(2, width=5.0)
        ax = axes[0, 0]
        ax.fill_between(layers, q[:, 0], q[:, 4], color="#9ecae1", alpha=0.4, label="5–95 %")
        ax.fill_between(layers, q[:, 1], q[:, 3], color="#4292c6", alpha=0.5, label="25–75 %")
        ax.plot(layers, q[:, 2], marker="o", color="#08306b", label="median")
        ax.axhline(1.0, ls="--", color="0.3", lw=1, label="uniform router")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("routing entropy / log N")
        _legend_outside(ax)
        ax = axes[0, 1]
        top1 = [torch.softmax(l, -1).max(dim=1).values.double().mean().item() for l in sample.logits]
        ax.plot(layers, top1, marker="s", color="#a50f15", label="mean top-1 probability")
        ax.axhline(1 / sample.num_experts, ls="--", color="0.3", lw=1, label="uniform 1/N")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("top-1 routing probability")
        _legend_outside(ax)
        return _title(fig, "Routing entropy across layers", subtitle)


def plot_concentration(conc: pd.DataFrame, subtitle: str | None = None):
    """Share of the routing mass in the top-1/2/4/8 experts per layer (solid) vs uniform (dashed)."""
    with _style():
        fig, axes = _figure(width=6.0)
        ax = axes[0, 0]
        colors = sns.color_palette("rocket", conc["k"].nunique())
        for color, (k, rows) in zip(colors, conc.groupby("k")):
            ax.plot(rows["layer"], rows["mass"], marker="o", color=color, label=f"top-{k}")
            ax.axhline(rows["uniform"].iloc[0], ls=":", color=color, lw=1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("share of routing probability mass")
        _legend_outside(ax, title="dotted: uniform router")
        return _title(fig, "Weight concentration: mass in the top-k experts", subtitle)


def plot_mass_left_out(sample: RoutingSample, subtitle: str | None = None):
    """Per layer, the distribution over tokens of the probability mass outside the native top-k."""
    left = [(1 - torch.topk(torch.softmax(l.double(), -1), sample.top_k, dim=-1).values.sum(dim=1)).numpy()
            for l in sample.logits]
    with _style():
        fig, axes = _figure(width=6.0)
        ax = axes[0, 0]
        layers = np.arange(sample.num_layers)
        ax.boxplot(left, positions=layers, widths=0.5, showfliers=False, patch_artist=True,
                   boxprops=dict(facecolor="#fdd0a2"), medianprops=dict(color="#7f2704"))
        ax.plot(layers, [v.mean() for v in left], marker="D", color="#7f2704", lw=1, label="mean")
        ax.axhline(1 - sample.top_k / sample.num_experts, ls="--", color="0.3", lw=1,
                   label=f"uniform router ({1 - sample.top_k / sample.num_experts:.0%})")
        ax.set_xticks(layers, [str(l) for l in layers])
        ax.set_ylim(0, 1)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel(f"probability mass outside the top-{sample.top_k}")
        _legend_outside(ax)
        return _title(fig, f"Routing mass the native top-{sample.top_k} leaves out", subtitle)


def plot_domain_usage(usage: pd.DataFrame, layer: int, subtitle: str | None = None):
    """Heatmap source × expert of log2(P(expert | source) / P(expert)) in one layer: red = the source
    uses the expert more than average, blue = less."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.log2(usage.drop(index="all") / usage.loc["all"])
    lift = lift.replace([np.inf, -np.inf], np.nan).clip(-3, 3)
    with _style():
        fig, axes = _figure(width=_width(usage.shape[1], 0.2, 3), height=max(3.0, 1.5 + 0.35 * len(lift)))
        sns.heatmap(lift, ax=axes[0, 0], cmap="RdBu_r", center=0, vmin=-3, vmax=3,
                          cbar_kws={"label": "log2 lift vs all text (clipped at ±3)"},
                          xticklabels=max(1, usage.shape[1] // 16))
        axes[0, 0].set_xlabel("expert")
        axes[0, 0].set_ylabel("text source")
        return _title(fig, f"Per-source expert usage, layer {layer}", subtitle)


def plot_specialisation(spec: pd.DataFrame, subtitle: str | None = None):
    """Mutual information between text source and chosen expert per layer, with the chance level."""
    with _style():
        fig, axes = _figure(width=6.0)
        ax = axes[0, 0]
        ax.plot(spec["layer"], spec["mi_bits"], marker="o", color="#6a51a3", label="I(source; expert)")
        ax.plot(spec["layer"], spec["mi_shuffled_bits"], marker="x", ls="--", color="0.4",
                label="shuffled sources (chance)")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("mutual information (bits)")
        _legend_outside(ax)
        return _title(fig, "Expert specialisation by text source", subtitle)


def plot_token_view(view: pd.DataFrame, value: str = "top1_prob", subtitle: str | None = None, max_tokens: int = 48):
    """Heatmap token × layer of ``value`` (default the top-1 probability), each cell annotated with
    the top-1 expert's id."""
    view = view[view["position"] < view["position"].min() + max_tokens]
    grid = view.pivot(index="layer", columns="position", values=value)
    experts = view.pivot(index="layer", columns="position", values="top1_expert")
    labels = view.drop_duplicates("position").sort_values("position")["token"].map(lambda t: repr(t)[1:-1])
    with _style():
        fig, axes = _figure(width=_width(grid.shape[1], 0.38, 2, minimum=6.0), height=max(3.0, 0.4 * grid.shape[0] + 1.6))
        ax = axes[0, 0]
        sns.heatmap(grid, ax=ax, cmap="magma", annot=experts.to_numpy(), fmt="d", annot_kws={"fontsize": 6},
                          cbar_kws={"label": value.replace("_", " ")}, xticklabels=list(labels))
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.set_xlabel("token")
        ax.set_ylabel("MoE layer")
        return _title(fig, f"Token-level routing: {value.replace('_', ' ')} (numbers: top-1 expert)", subtitle)


def plot_bh_explained(explanation: BhExplanation, subtitle: str | None = None, zoom: int = 16):
    """Sorted p-values against the BH line c_k = (k/N)·α: all N ranks on a log scale (left) and the
    first ``zoom`` ranks (right). Filled: selected by the router; black ring: native top-k; the
    dotted line marks k*."""
    t = explanation.table
    with _style():
        fig, axes = _figure(2, width=5.4)
        for ax, part, logy in ((axes[0, 0], t, True), (axes[0, 1], t.head(zoom), False)):
            ax.plot(part["rank"], part["critical"], color="#d62728", lw=1.5,
                    label=f"critical value c_k ({explanation.procedure.upper()}, α = {plots.knob(explanation.alpha)})")
            ax.scatter(part["rank"], part["pvalue"], s=22, facecolor=np.where(part["selected"], "#d62728", "white"),
                       edgecolor="#444444", linewidth=0.7, zorder=3, label="sorted p-values (filled: selected)")
            native = part[part["native"]]
            ax.scatter(native["rank"], native["pvalue"], s=80, facecolor="none", edgecolor="black", linewidth=1.2,
                       zorder=4, label="native top-k expert")
            if explanation.k_star:
                ax.axvline(explanation.k_star + 0.5, ls=":", color="0.3", lw=1, label=f"k* = {explanation.k_star}")
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("rank k (experts by increasing p-value)")
            ax.set_ylabel("p-value")
        _legend_outside(axes[0, 1])
        axes[0, 1].set_title(f"first {zoom} ranks")
        return _title(fig, f"BH on one token, layer {explanation.layer} ({explanation.pvalues} p-values): "
                           f"k* = {explanation.k_star}, selected {explanation.k_selected}", subtitle)


def plot_smallest_pvalues(smallest: Mapping[str, np.ndarray], alpha: float, num_experts: int, subtitle: str | None = None):
    """Per p-value model, the distribution over tokens (all layers) of the smallest of the N p-values,
    with α/N (BH's first critical value) and α marked: left of α/N BH can select on its own."""
    with _style():
        fig, axes = _figure(len(smallest), width=3.6, height=3.4)
        for ax, (model, values) in zip(axes[0], smallest.items()):
            logs = np.log10(np.clip(values, 1e-12, 1))
            low = min(float(logs.min()), math.log10(alpha / num_experts)) - 0.2
            high = max(float(logs.max()), math.log10(alpha)) + 0.1
            ax.hist(logs, bins=np.linspace(low, high, 41), color="#6baed6", edgecolor="white")
            ax.axvline(math.log10(alpha / num_experts), color="#d62728", lw=1.5, label=f"α/N = {alpha / num_experts:.2g}")
            ax.axvline(math.log10(alpha), color="#ff7f0e", lw=1, ls="--", label=f"α = {plots.knob(alpha)}")
            share = float((values <= alpha / num_experts).mean())
            ax.set_title(f"{model}: {share:.0%} of tokens ≤ α/N")
            ax.set_xlabel("log10 smallest p-value of the token")
            ax.set_ylabel("tokens × layers")
            _legend_outside(ax)
        return _title(fig, "Why naive p-values fail: the smallest p-value per token", subtitle)


def plot_count_heatmap(tokens: Sequence[str], counts: np.ndarray, subtitle: str | None = None, max_k: int | None = None):
    """Heatmap layer × token of the experts each token used, annotated."""
    counts = np.asarray(counts)
    with _style():
        fig, axes = _figure(width=_width(counts.shape[1], 0.38, 2, minimum=6.0), height=max(3.0, 0.4 * counts.shape[0] + 1.6))
        ax = axes[0, 0]
        sns.heatmap(counts, ax=ax, cmap="viridis", annot=True, fmt="d", annot_kws={"fontsize": 6}, vmin=0,
                          vmax=max_k, cbar_kws={"label": "experts"}, xticklabels=[repr(t)[1:-1] for t in tokens])
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.set_xlabel("token")
        ax.set_ylabel("MoE layer")
        return _title(fig, "Experts per token and layer", subtitle)


def plot_maxk_lines(grid: pd.DataFrame, metric: str, topk: pd.DataFrame | None = None, ylabel: str | None = None,
                    subtitle: str | None = None, title: str | None = None):
    """``metric`` against max_k (log2 axis), one line per α; top-k at k = max_k dashed when given."""
    with _style():
        fig, axes = _figure(width=5.8)
        ax = axes[0, 0]
        colors = sns.color_palette("colorblind", grid["alpha"].nunique())
        for color, (alpha, rows) in zip(colors, grid.groupby("alpha")):
            rows = rows.sort_values("max_k")
            ax.plot(rows["max_k"], rows[metric], marker="o", color=color, label=f"BH α = {plots.knob(alpha)}")
        if topk is not None and len(topk) and metric in topk:
            rows = topk.sort_values("k")
            ax.plot(rows["k"], rows[metric], marker="s", ls="--", color="#222222", label="top-k (k = max_k)")
        ax.set_xscale("log", base=2)
        ks = sorted(set(grid["max_k"].astype(int)))
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("max_k")
        ax.set_ylabel(ylabel or plots.label_for(metric))
        _legend_outside(ax)
        return _title(fig, title or f"{plots.label_for(metric)} vs max_k", subtitle)


# =========================================================================== tokens, experts, layers


def plot_token_experts(tokens, counts, min_k: int | None = None, max_k: int | None = None,
                       subtitle: str | None = None) -> Figure:
    """Token-level bars: experts per token (mean over layers for ``counts`` [L, T], with min–max
    over layers as error bars; ``counts`` [T] as is). ``tokens``: T strings (decoded pieces)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[None, :] if c.ndim == 1 else c
    c = np.where(c >= 0, c, np.nan)  # the recorder's -1 = not recorded
    mean = np.nanmean(c, axis=0)
    err = np.vstack([mean - np.nanmin(c, axis=0), np.nanmax(c, axis=0) - mean]) if c.shape[0] > 1 else None
    with _style():
        fig, axes = _figure(width=_width(len(mean), 0.3, 1.5))
        ax = axes[0, 0]
        norm = matplotlib.colors.Normalize(vmin=min_k if min_k is not None else np.nanmin(mean),
                                           vmax=max_k if max_k is not None else np.nanmax(mean) + 1e-9)
        colors = matplotlib.colormaps["viridis"](norm(mean))
        ax.bar(np.arange(len(mean)), mean, yerr=err, color=colors, capsize=2, edgecolor="white")
        ax.set_xticks(np.arange(len(mean)), [repr(str(t))[1:-1] for t in tokens], rotation=90, fontsize=7)
        for bound, name in ((min_k, "min_k"), (max_k, "max_k")):
            if bound is not None:
                ax.axhline(bound, ls="--", lw=1, color="0.4")
                ax.annotate(name, (1.0, bound), xycoords=("axes fraction", "data"), fontsize=7, va="bottom", ha="right")
        ax.set_xlabel("token")
        ax.set_ylabel("experts per layer" + (" (mean; bars: min–max over layers)" if err is not None else ""))
        return _title(fig, "Experts per token", subtitle)


def plot_expert_utilization(load, normalize: str = "relative", layers=None, subtitle: str | None = None) -> Figure:
    """Heatmap layers × experts of the load [L, N] (e.g. :func:`analysis.load_counts`).
    ``normalize``: ``"relative"`` = load / mean load of its layer (1 = uniform, 0 = dead),
    ``"share"`` = fraction of the layer's assignments, ``None`` = raw counts."""
    x = np.asarray(load, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if normalize == "relative":
            x, bar = x / x.mean(axis=1, keepdims=True), "load / mean load of the layer (1 = uniform)"
        elif normalize == "share":
            x, bar = x / x.sum(axis=1, keepdims=True), "share of the layer's assignments"
        else:
            bar = "tokens routed"
    layer_ids = np.arange(x.shape[0]) if layers is None else list(layers)
    with _style():
        fig, axes = _figure(width=_width(x.shape[1], 0.18, 3), height=max(3.2, 1.8 + 0.3 * x.shape[0]))
        ax = axes[0, 0]
        sns.heatmap(x, ax=ax, cmap="viridis", cbar_kws={"label": bar}, yticklabels=layer_ids,
                    xticklabels=max(1, x.shape[1] // 16))
        ax.set_xlabel("expert")
        ax.set_ylabel(label_for("layer"))
        return _title(fig, "Expert utilisation", subtitle)


def plot_coactivation(matrix, subtitle: str | None = None, title: str = "Expert co-activation") -> Figure:
    """Heatmap of one layer's co-activation [N, N] (:func:`analysis.coactivation`, any normalisation)."""
    m = np.asarray(matrix, dtype=np.float64)
    with _style():
        fig, axes = _figure(width=6.4, height=5.6)
        ax = axes[0, 0]
        sns.heatmap(m, ax=ax, cmap="mako", square=True, cbar_kws={"label": "co-activation"},
                    xticklabels=max(1, m.shape[1] // 16), yticklabels=max(1, m.shape[0] // 16))
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i")
        return _title(fig, title, subtitle)
