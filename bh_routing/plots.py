"""The suite's figure style and the figures of sweeps (the router's own figures, per token, expert and
layer, are in :mod:`bh_routing.routing_plots`, in this style). Each function takes a tidy DataFrame (or arrays), returns a matplotlib
``Figure`` and labels every axis; ``subtitle`` (model, data, settings) becomes the title's second
line, so a figure always says what produced it. ``save(fig, path)`` writes 150 dpi, ``export`` 300.

Figures are built with ``matplotlib.figure.Figure`` directly, never through pyplot: nothing depends
on (or changes) the backend, so they render headless exactly as with Agg, a sweep that draws
hundreds of them leaks nothing, and a notebook shows a returned figure once (not twice).

The usual table is ``runs``: one row per (configuration, dataset) run, with columns such as
``label`` (configuration name), ``strategy`` (family: topk, bh, top_p, ...), ``dataset``,
``mean_experts`` (mean active experts per token per layer), quality (``perplexity``,
``accuracy``, ...), knobs (``alpha``, ``temperature``, ``max_k``, ``pvalues``) and costs
(``latency_ms``, ``load_cv``, ...). Column names are arguments wherever a plot reads one.
"""
from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from . import analysis

DPI = 150
EXPORT_DPI = 300

# One colour and marker per strategy family, the same in every figure.
STRATEGY_STYLE = {
    "topk": ("#222222", "s"), "topk_renorm": ("#7f7f7f", "D"), "topk_uniform": ("#bcbd22", "d"),
    "bh": ("#d62728", "o"), "by": ("#ff7f0e", "v"), "top_p": ("#1f77b4", "^"),
    "threshold": ("#2ca02c", "P"), "ratio": ("#9467bd", "X"), "entropy": ("#8c564b", "h"),
    "hc": ("#e377c2", "*"),
}
_EXTRA_COLORS = ["#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5"]
_EXTRA_MARKERS = ["p", "<", ">", "8", "H", "1"]

LABELS = {
    "mean_experts": "mean active experts per token per layer",
    "experts": "experts per token per layer",
    "perplexity": "perplexity (lower is better)",
    "accuracy": "accuracy (higher is better)",
    "alpha": "α (BH level)",
    "temperature": "temperature T",
    "weights_temperature": "mixing-weights temperature",
    "max_k": "max_k",
    "latency_ms": "latency (ms)",
    "ms_per_token": "ms per generated token (median)",
    "load_cv": "expert-load CV",
    "cv": "expert-load CV (std / mean)",
    "reduction_pct": "experts saved vs native top-k (%)",
    "ceiling_rate": "share of tokens at max_k",
    "floor_rate": "share of tokens at min_k",
    "layer": "MoE layer",
}


def label_for(column: str) -> str:
    return LABELS.get(column, column.replace("_", " "))


def strategy_style(name: str) -> tuple[str, str]:
    """(colour, marker) of a strategy family; unknown names get a stable extra style."""
    if name in STRATEGY_STYLE:
        return STRATEGY_STYLE[name]
    slot = sum(map(ord, str(name))) % len(_EXTRA_COLORS)  # stable across runs, unlike hash()
    return _EXTRA_COLORS[slot], _EXTRA_MARKERS[slot]


_RC = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85),
       "figure.dpi": DPI, "savefig.dpi": DPI, "axes.titlesize": 10, "figure.titlesize": 11}


@contextlib.contextmanager
def _style():
    with matplotlib.rc_context(_RC):  # local: importing this module changes no global style
        yield


def _figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.2, **kw):
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


MAX_WIDTH = 16.0  # inches: wider figures (one bar per run of a big sweep) are unreadable anyway


def _width(n: int, per_item: float, base: float, minimum: float = 5.0) -> float:
    """Figure width for ``n`` bars/columns, never wider than :data:`MAX_WIDTH`."""
    return float(min(MAX_WIDTH, max(minimum, per_item * n + base)))


def knob(value) -> str:
    """A knob value for a label: whole numbers as ints ("8", not "8.0"), others with %g."""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(number)) if number.is_integer() else f"{number:g}"


def spans_decades(values, ratio: float = 10.0) -> bool:
    """True when the positive ``values`` span more than ``ratio`` (max / min): a log axis reads them."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return bool(v.size >= 2 and v.min() > 0 and v.max() / v.min() > ratio)


def _legend_outside(ax, **kw):
    """The legend beside the axes (right, top-aligned), never over the data; None if nothing is labelled."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     borderaxespad=0.0, frameon=False, **kw)


def _title(fig: Figure, title: str, subtitle: str | None) -> Figure:
    # a long subtitle (the bundled model's description) wraps to the figure's width
    width = max(40, int(fig.get_figwidth() * 12))
    fig.suptitle(title if not subtitle else f"{title}\n{textwrap.fill(subtitle, width)}")
    return fig


def save(fig: Figure, path, dpi: int = DPI) -> Path:
    """Write ``fig`` (format from the suffix, e.g. .png/.pdf/.svg); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def export(fig: Figure, path, dpi: int = EXPORT_DPI) -> Path:
    """Publication export: :func:`save` at 300 dpi."""
    return save(fig, path, dpi=dpi)


def _groups(frame: pd.DataFrame, column: str | None):
    """(name, sub-frame) pairs, one (None, frame) when ``column`` is None or absent."""
    if column is None or column not in frame:
        return [(None, frame)]
    return list(frame.groupby(column, sort=True, dropna=False))


def _line_style(name, index: int, column: str | None):
    if column == "strategy":
        return strategy_style(name)
    return sns.color_palette("colorblind", 10)[index % 10], "o"


# --------------------------------------------------------------------------- Pareto frontier


def pareto_front(points, higher_is_better: bool = False) -> np.ndarray:
    """Indices of the non-dominated points of ``points`` [n, 2] = (cost x, quality y), sorted by x.

    Cost is always lower-better; quality is higher-better if ``higher_is_better``. Point i is
    dominated if some j has x_j <= x_i and y_j at least as good, and is strictly better in one of
    them. Identical points do not dominate each other. Rows with NaN are never on the front.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    ok = np.flatnonzero(~np.isnan(pts).any(axis=1))
    if ok.size == 0:
        return ok
    x = pts[ok, 0]
    q = pts[ok, 1] if higher_is_better else -pts[ok, 1]  # oriented so that higher is better
    order = np.lexsort((-q, x))  # by x, then best quality first
    x, q = x[order], q[order]
    new_x = np.r_[True, x[1:] != x[:-1]]
    group = np.cumsum(new_x) - 1  # which distinct x each point has
    best_in_group = np.maximum.reduceat(q, np.flatnonzero(new_x))
    # the best quality among strictly smaller x: a running max over the previous groups
    best_before = np.r_[-np.inf, np.maximum.accumulate(best_in_group)[:-1]]
    keep = (q >= best_in_group[group]) & (q > best_before[group])
    return ok[order[keep]]


def plot_pareto(runs: pd.DataFrame, quality: str = "perplexity", higher_is_better: bool = False,
                x: str = "mean_experts", strategy: str = "strategy", dataset: str | None = "dataset",
                native_strategy: str | None = "topk", quality_label: str | None = None, logy: bool | None = None,
                subtitle: str | None = None, title: str | None = None) -> Figure:
    """Quality vs mean active experts, one panel per dataset: one colour/marker per strategy family,
    the Pareto frontier over all points of the panel (staircase), the native router's top-k points
    (``native_strategy``) drawn large with a black edge and joined by a dashed reference curve.

    ``runs`` columns: ``x``, ``quality``, ``strategy``, ``dataset`` (optional). ``logy=None``: a log
    quality axis when the panel's values span decades (a few outliers would flatten the rest)."""
    panels = _groups(runs, dataset)
    with _style():
        fig, axes = _figure(len(panels), width=5.6, height=4.4)
        for ax, (name, frame) in zip(axes[0], panels):
            frame = frame.dropna(subset=[x, quality])
            for family, rows in _groups(frame, strategy):
                color, marker = strategy_style(family)
                native = family == native_strategy
                if native and len(rows) > 1:  # the reference curve every strategy has to beat
                    ordered = rows.sort_values(x)
                    ax.plot(ordered[x], ordered[quality], ls="--", lw=1, color=color, zorder=2)
                ax.scatter(rows[x], rows[quality], color=color, marker=marker, s=90 if native else 40,
                           edgecolor="black" if native else "white", linewidth=1.2 if native else 0.5,
                           label=f"{family} (native router)" if native else family, zorder=4 if native else 3)
            front = frame.iloc[pareto_front(frame[[x, quality]].to_numpy(), higher_is_better)]
            if len(front):
                ax.plot(front[x], front[quality], drawstyle="steps-post", color="0.45", lw=1.5, alpha=0.8,
                        label="Pareto frontier", zorder=1)
            if logy or (logy is None and spans_decades(frame[quality])):
                ax.set_yscale("log")
            ax.set_xlabel(label_for(x))
            ax.set_ylabel(quality_label or label_for(quality))
            ax.set_title(f"dataset: {name}" if name is not None else "all runs")
            _legend_outside(ax)
        better = "higher" if higher_is_better else "lower"
        return _title(fig, title or f"Quality vs compute: {quality} ({better} is better) vs mean active experts",
                      subtitle)


# --------------------------------------------------------------------------- sensitivity curves


def plot_sensitivity(runs: pd.DataFrame, x: str, metrics=("mean_experts",), hue: str | None = None,
                     logx: bool = False, subtitle: str | None = None, title: str | None = None) -> Figure:
    """One panel per metric: the mean of each metric against knob ``x``, one line per ``hue``.
    ``runs`` columns: ``x``, each metric, ``hue`` (optional)."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    with _style():
        fig, axes = _figure(len(metrics), width=5.2)
        for ax, metric in zip(axes[0], metrics):
            for i, (name, rows) in enumerate(_groups(runs, hue)):
                color, marker = _line_style(name, i, hue)
                curve = rows.groupby(x)[metric].mean()
                ax.plot(curve.index, curve.values, marker=marker, color=color,
                        label=f"{hue} = {knob(name)}" if name is not None else None)
            if logx:
                ax.set_xscale("log")
            if spans_decades(runs[metric]):
                ax.set_yscale("log")
            ax.set_xlabel(label_for(x))
            ax.set_ylabel(label_for(metric))
            if hue is not None and hue in runs:
                _legend_outside(ax)
        return _title(fig, title or f"Sensitivity to {label_for(x)}", subtitle)


def plot_alpha_sensitivity(runs: pd.DataFrame, metrics=("mean_experts",), hue: str | None = "pvalues",
                           x: str = "alpha", subtitle: str | None = None) -> Figure:
    """Metrics vs α (log axis), one line per p-value model by default."""
    return plot_sensitivity(runs, x, metrics, hue, logx=True, subtitle=subtitle,
                            title="α sensitivity of BH routing")


def plot_temperature_sensitivity(runs: pd.DataFrame, metrics=("mean_experts",), hue: str | None = "strategy",
                                 x: str = "temperature", subtitle: str | None = None) -> Figure:
    """Metrics vs the selection temperature T, one line per strategy by default."""
    return plot_sensitivity(runs, x, metrics, hue, logx=False, subtitle=subtitle,
                            title="Temperature sensitivity")


def plot_saturation(runs: pd.DataFrame, x: str = "alpha", y: str = "mean_experts", max_k: str = "max_k",
                    ceiling: str | None = "ceiling_rate", logx: bool = True, subtitle: str | None = None) -> Figure:
    """Where the count saturates: ``y`` vs ``x``, one line per ``max_k`` with its ceiling drawn
    dashed in the same colour; a second panel with the share of tokens at max_k when ``runs`` has
    the ``ceiling`` column. The ``y`` axis is scaled from the data, not to the largest max_k (a
    ceiling of 64 would flatten 3.7 vs 6.6): ceilings above the data are named in the legend only."""
    show_ceiling = ceiling is not None and ceiling in runs
    highest = float(np.nanmax(runs[y])) if runs[y].notna().any() else 1.0
    # ceilings near the data (up to 1.5x its maximum) are shown; farther ones would squash the curves
    near = [float(k) for k in (runs[max_k].dropna().unique() if max_k in runs else ()) if float(k) <= 1.5 * highest]
    top = max([1.15 * highest] + [1.05 * k for k in near])
    with _style():
        fig, axes = _figure(2 if show_ceiling else 1, width=5.2)
        for i, (k, rows) in enumerate(_groups(runs, max_k)):
            color = sns.color_palette("colorblind", 10)[i % 10]
            curve = rows.groupby(x)[[y] + ([ceiling] if show_ceiling else [])].mean()
            drawn = k is not None and float(k) <= top
            name = f"max_k = {knob(k)}" + ("" if k is None or drawn else " (ceiling above the axis)")
            axes[0, 0].plot(curve.index, curve[y], marker="o", color=color, label=name)
            if drawn:
                axes[0, 0].axhline(float(k), ls="--", lw=1, color=color)
            if show_ceiling:
                axes[0, 1].plot(curve.index, curve[ceiling], marker="o", color=color, label=f"max_k = {knob(k)}")
        axes[0, 0].set_ylim(0.0, top)
        for ax, metric in zip(axes[0], [y, ceiling]):
            if logx:
                ax.set_xscale("log")
            ax.set_xlabel(label_for(x))
            ax.set_ylabel(label_for(metric))
            _legend_outside(ax)
        return _title(fig, f"Saturation: {label_for(y)} vs {label_for(x)} (dashed: max_k)", subtitle)


# --------------------------------------------------------------------------- per-configuration bars


def plot_comparison_bars(runs: pd.DataFrame, metric: str, label: str = "label", strategy: str | None = "strategy",
                         yerr: str | None = None, ci: tuple[str, str] | None = None, reference: float | None = None,
                         reference_label: str = "reference", ylabel: str | None = None, subtitle: str | None = None,
                         title: str | None = None) -> Figure:
    """One bar per configuration (``label``), coloured by ``strategy`` family when present; error
    bars from a ``yerr`` column (symmetric) or ``ci`` = (low column, high column); an optional
    horizontal ``reference`` line (e.g. native k = 8 or the baseline perplexity). The legend names
    the colours (strategy families); the width is capped at :data:`MAX_WIDTH`."""
    from matplotlib.patches import Patch

    frame = runs.reset_index(drop=True)
    by_family = bool(strategy) and strategy in frame
    colors = [strategy_style(s)[0] for s in frame[strategy]] if by_family else "#4c72b0"
    err = None
    if yerr is not None:
        err = frame[yerr].to_numpy()
    elif ci is not None:
        err = np.vstack([frame[metric] - frame[ci[0]], frame[ci[1]] - frame[metric]])
    with _style():
        fig, axes = _figure(width=_width(len(frame), 0.55, 2))
        ax = axes[0, 0]
        positions = np.arange(len(frame))
        ax.bar(positions, frame[metric], color=colors, yerr=err, capsize=3, edgecolor="white")
        ax.set_xticks(positions, frame[label].astype(str), rotation=45, ha="right",
                      fontsize=8 if len(frame) <= 30 else 6)
        if reference is not None:
            ax.axhline(reference, ls="--", color="0.3", lw=1, label=reference_label)
        if by_family:
            handles, labels = ax.get_legend_handles_labels()
            handles += [Patch(facecolor=strategy_style(f)[0], label=str(f)) for f in dict.fromkeys(frame[strategy])]
            ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                      borderaxespad=0.0, frameon=False, title=strategy)
        else:
            _legend_outside(ax)
        ax.set_xlabel("configuration")
        ax.set_ylabel(ylabel or label_for(metric))
        return _title(fig, title or f"{label_for(metric)} by configuration", subtitle)


def plot_experts_by_config(runs: pd.DataFrame, metric: str = "mean_experts", native_k: int | None = 8,
                           yerr: str | None = None, subtitle: str | None = None, **kw) -> Figure:
    """Average active experts per configuration, with the native k as reference line."""
    return plot_comparison_bars(runs, metric, yerr=yerr, reference=native_k, reference_label=f"native k = {knob(native_k)}",
                                subtitle=subtitle, title="Average active experts by configuration", **kw)


def plot_reduction(runs: pd.DataFrame, native_k: int = 8, mean_experts: str = "mean_experts", group: str = "task",
                   subtitle: str | None = None) -> Figure:
    """Experts saved vs native top-k, in %: 100 · (1 − mean_experts / native_k), one bar per
    configuration (``label``); side by side per ``group`` (e.g. task) when it takes several values."""
    frame = runs.assign(reduction_pct=100.0 * (1.0 - runs[mean_experts].astype(float) / native_k))
    title = f"Reduction in active experts vs native top-{native_k}"
    if group in frame and frame[group].nunique() > 1:
        return plot_grouped_bars(frame, x="label", y="reduction_pct", hue=group, title=title, subtitle=subtitle,
                                 xlabel="configuration")
    return plot_comparison_bars(frame, "reduction_pct", reference=0.0, reference_label=f"native top-{native_k}",
                                subtitle=subtitle, title=title)


def plot_load_cv(load: pd.DataFrame, value: str = "cv", label: str = "label", layer: str = "layer",
                 subtitle: str | None = None) -> Figure:
    """Expert-load imbalance: per layer, one line per configuration when ``load`` has a ``layer``
    column (e.g. :func:`analysis.expert_load` frames concatenated with a ``label``); else bars."""
    if layer not in load:
        return plot_comparison_bars(load, value, label=label, subtitle=subtitle, title="Expert-load CV by configuration")
    with _style():
        fig, axes = _figure(width=6.4)
        ax = axes[0, 0]
        for i, (name, rows) in enumerate(_groups(load, label)):
            color = sns.color_palette("colorblind", 10)[i % 10]
            ordered = rows.sort_values(layer)
            ax.plot(ordered[layer], ordered[value], marker="o", color=color, label=name)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))   # layers are whole numbers
        ax.set_xlabel(label_for(layer))
        ax.set_ylabel(label_for(value))
        if label in load:
            _legend_outside(ax)
        return _title(fig, "Expert-load imbalance per layer", subtitle)


# --------------------------------------------------------------------------- grids and prompt-suite figures


def plot_alpha_maxk_heatmap(runs: pd.DataFrame, value: str = "mean_experts", row: str = "alpha", col: str = "max_k",
                            fmt: str = ".2f", subtitle: str | None = None) -> Figure:
    """Annotated heatmap of ``value`` (mean over duplicates) on the ``row`` × ``col`` grid."""
    grid = runs.pivot_table(index=row, columns=col, values=value, aggfunc="mean")
    with _style():
        fig, axes = _figure(width=_width(grid.shape[1], 0.8, 2.5, minimum=6.0), height=max(3.8, 1.8 + 0.45 * grid.shape[0]))
        ax = axes[0, 0]
        sns.heatmap(grid, ax=ax, annot=True, fmt=fmt, cmap="viridis", cbar_kws={"label": label_for(value)},
                    annot_kws={"fontsize": 7})
        ax.set_xlabel(label_for(col))
        ax.set_ylabel(label_for(row))
        return _title(fig, f"{label_for(row)} × {label_for(col)} grid", subtitle)


def plot_experts_by_category(frame: pd.DataFrame, category: str = "category", value: str = "experts",
                             hue: str | None = "label", subtitle: str | None = None) -> Figure:
    """Box plot of experts per token (or per prompt) by prompt ``category``, one box per ``hue``
    configuration when present. ``frame``: one row per token/prompt with ``category``, ``value``."""
    with _style():
        fig, axes = _figure(width=_width(frame[category].nunique(), 0.9, 2))
        ax = axes[0, 0]
        sns.boxplot(data=frame, x=category, y=value, hue=hue if hue in frame else None, ax=ax, fliersize=2,
                    legend=hue in frame)
        ax.set_xlabel("prompt category")
        ax.set_ylabel(label_for(value))
        ax.tick_params(axis="x", labelrotation=30)
        _legend_outside(ax, title=hue)
        return _title(fig, "Experts by prompt category", subtitle)


def plot_grouped_bars(frame: pd.DataFrame, x: str, y: str, hue: str, title: str, subtitle: str | None = None,
                      xlabel: str | None = None, ylabel: str | None = None) -> Figure:
    """Bars of ``y`` per ``x`` group, one bar per ``hue`` value; the legend sits beside the axes,
    never over the bars."""
    with _style():
        fig, axes = _figure(width=_width(frame[x].nunique() * frame[hue].nunique(), 0.12, 4, minimum=6.4))
        ax = axes[0, 0]
        sns.barplot(data=frame, x=x, y=y, hue=hue, ax=ax, palette="colorblind")
        ax.tick_params(axis="x", labelrotation=30)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        ax.set_xlabel(xlabel or label_for(x))
        ax.set_ylabel(ylabel or label_for(y))
        _legend_outside(ax, title=hue)
        return _title(fig, title, subtitle)


def plot_experts_vs_latency(runs: pd.DataFrame, x: str = "mean_experts", y: str = "latency_ms",
                            strategy: str = "strategy", label: str | None = "label", yerr: str | None = None,
                            subtitle: str | None = None) -> Figure:
    """Scatter of latency against mean active experts, one colour/marker per strategy family; points
    are annotated with their ``label`` when there are at most 15 (more would overlap)."""
    with _style():
        fig, axes = _figure(width=5.6)
        ax = axes[0, 0]
        for name, rows in _groups(runs, strategy):
            color, marker = strategy_style(name)
            ax.errorbar(rows[x], rows[y], yerr=None if yerr is None else rows[yerr], fmt=marker, color=color,
                        capsize=2, label=name, ms=6)
        if label in runs and len(runs) <= 15:
            for _, r in runs.iterrows():
                ax.annotate(str(r[label]), (r[x], r[y]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if spans_decades(runs[y]):
            ax.set_yscale("log")
        ax.set_xlabel(label_for(x))
        ax.set_ylabel(label_for(y))
        _legend_outside(ax)
        return _title(fig, "Active experts vs latency", subtitle)


# --------------------------------------------------------------------------- statistics figures


def plot_paired_boxplots(frame: pd.DataFrame, value: str = "value", label: str = "label", unit: str | None = None,
                         ylabel: str | None = None, subtitle: str | None = None) -> Figure:
    """Box plots of per-unit values (e.g. per-prompt NLL or experts) per configuration, points on
    top; with a ``unit`` column the same unit is joined across configurations (the pairing)."""
    order = list(dict.fromkeys(frame[label]))
    with _style():
        fig, axes = _figure(width=_width(len(order), 1.1, 2, minimum=4.5))
        ax = axes[0, 0]
        sns.boxplot(data=frame, x=label, y=value, order=order, ax=ax, color="#c6dbef", fliersize=0)
        if unit is not None and unit in frame:
            wide = frame.pivot_table(index=unit, columns=label, values=value, aggfunc="mean")[order]
            ax.plot(np.arange(len(order)), wide.to_numpy().T, color="0.5", lw=0.5, alpha=0.5)
        sns.stripplot(data=frame, x=label, y=value, order=order, ax=ax, color="#08519c", size=3, jitter=0.15)
        ax.set_xlabel("configuration")
        ax.set_ylabel(ylabel or label_for(value))
        ax.tick_params(axis="x", labelrotation=30)
        paired = f" (lines join the same {unit})" if unit is not None and unit in frame else ""
        return _title(fig, f"{ylabel or label_for(value)} by configuration{paired}", subtitle)


def plot_difference_histogram(baseline, candidate, unit: str = "prompt", stats: dict | None = None,
                              xlabel: str = "candidate − baseline", subtitle: str | None = None) -> Figure:
    """Histogram of the paired differences candidate − baseline with zero, the mean and its CI, and
    the tests' results (from ``stats`` = :func:`analysis.paired_comparison`, computed if None)."""
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    diff = diff[~np.isnan(diff)]
    stats = stats or analysis.paired_comparison(baseline, candidate, unit=unit)
    with _style():
        fig, axes = _figure(width=5.6)
        ax = axes[0, 0]
        ax.hist(diff, bins=min(40, max(5, diff.size // 5)), color="#9ecae1", edgecolor="white")
        ax.axvline(0.0, color="0.2", lw=1, label="no difference")
        ax.axvline(stats["mean_difference"], color="#d62728", lw=1.5, label="mean difference")
        if np.isfinite([stats["ci_low"], stats["ci_high"]]).all():
            ax.axvspan(stats["ci_low"], stats["ci_high"], color="#d62728", alpha=0.15,
                       label=f"{stats['confidence']:.0%} CI of the mean")
        text = (f"n = {stats['n']} {stats['unit']}s\n"
                f"paired t: p = {stats['t_pvalue']:.3g}\nWilcoxon: p = {stats['wilcoxon_pvalue']:.3g}\n"
                f"d_z = {stats['cohens_dz']:.3g}")
        ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", fontsize=7,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"number of {stats['unit']}s")
        _legend_outside(ax)
        return _title(fig, f"Paired differences per {stats['unit']}", subtitle)
