"""Every figure renders on small synthetic data, with every axis labelled; the Pareto frontier
against a brute-force O(n²) dominance check."""
import numpy as np
import pandas as pd
import pytest

from bh_routing import analysis, plots, routing_plots as rplots


def _dominated_brute_force(points, higher_is_better):
    sign = 1.0 if higher_is_better else -1.0
    out = []
    for i, (xi, yi) in enumerate(points):
        if np.isnan(xi) or np.isnan(yi):
            out.append(True)
            continue
        out.append(any(
            xj <= xi and sign * yj >= sign * yi and (xj < xi or sign * yj > sign * yi)
            for j, (xj, yj) in enumerate(points) if j != i and not (np.isnan(xj) or np.isnan(yj))))
    return np.array(out)


@pytest.mark.parametrize("higher_is_better", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_pareto_front_matches_brute_force(seed, higher_is_better):
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 6, size=(30, 2)).astype(float)  # small integer grid: many ties and duplicates
    points[rng.random(30) < 0.1, 1] = np.nan
    front = plots.pareto_front(points, higher_is_better)
    expected = np.flatnonzero(~_dominated_brute_force(points, higher_is_better))
    assert sorted(front.tolist()) == expected.tolist()
    assert np.all(np.diff(points[front, 0]) >= 0)  # ordered by cost for drawing


def test_pareto_front_simple_case():
    points = [(1, 30.0), (2, 20.0), (3, 25.0), (4, 10.0), (4, 12.0)]  # perplexity: lower is better
    assert plots.pareto_front(points, higher_is_better=False).tolist() == [0, 1, 3]
    assert plots.pareto_front([(1, 0.5), (2, 0.4), (3, 0.7)], higher_is_better=True).tolist() == [0, 2]
    assert plots.pareto_front(np.empty((0, 2))).tolist() == []


def _runs():
    rows = []
    for dataset in ("wikitext", "lambada"):
        for k in (2, 4, 8):
            rows.append(dict(label=f"top{k}", strategy="topk", dataset=dataset, alpha=np.nan, max_k=k,
                             pvalues="none", temperature=1.0, mean_experts=float(k), perplexity=30 - 2 * k,
                             accuracy=0.3 + 0.03 * k, latency_ms=10 + k, load_cv=0.5, ceiling_rate=1.0))
        for alpha in (0.01, 0.05, 0.2):
            for max_k in (4, 8):
                for pv in ("empirical", "zscore"):
                    mean = min(max_k, 1 + 20 * alpha + (pv == "zscore"))
                    rows.append(dict(label=f"bh a={alpha} k<={max_k} {pv}", strategy="bh", dataset=dataset,
                                     alpha=alpha, max_k=max_k, pvalues=pv, temperature=1.0, mean_experts=mean,
                                     perplexity=28 - 1.5 * mean, accuracy=0.32 + 0.02 * mean,
                                     latency_ms=9 + mean, load_cv=0.6, ceiling_rate=alpha))
        for t in (0.5, 1.0, 2.0):
            rows.append(dict(label=f"top_p T={t}", strategy="top_p", dataset=dataset, alpha=np.nan, max_k=8,
                             pvalues="none", temperature=t, mean_experts=2 + t, perplexity=25 - t,
                             accuracy=0.4, latency_ms=11 + t, load_cv=0.4, ceiling_rate=0.1))
    return pd.DataFrame(rows)


def _figures():
    runs = _runs()
    wiki = runs[runs.dataset == "wikitext"]
    few = wiki.iloc[:8]
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 9, size=(3, 12))
    indices = rng.integers(0, 16, size=(3, 200, 4))  # -1-free: every slot real
    load = analysis.load_counts(indices, 16)
    load_frame = pd.concat([analysis.expert_load(indices, 16).assign(label=name) for name in ("bh", "top8")])
    prompts = pd.DataFrame({"label": np.repeat(["top8", "bh"], 20), "value": rng.normal(3, 1, 40),
                            "prompt": np.tile(np.arange(20), 2),
                            "category": np.tile(["code", "prose", "math", "chat"], 10),
                            "experts": rng.uniform(1, 8, 40)})
    base = rng.normal(3, 1, 30)
    sub = "tiny-olmoe · synthetic · test"
    return {
        "pareto": plots.plot_pareto(runs, subtitle=sub),
        "pareto_accuracy": plots.plot_pareto(runs, quality="accuracy", higher_is_better=True, dataset=None),
        "alpha": plots.plot_alpha_sensitivity(wiki, metrics=["mean_experts", "perplexity"], subtitle=sub),
        "temperature": plots.plot_temperature_sensitivity(wiki[wiki.strategy == "top_p"], subtitle=sub),
        "tokens": rplots.plot_token_experts([f"tok{i}" for i in range(12)], counts, min_k=1, max_k=8, subtitle=sub),
        "tokens_1d": rplots.plot_token_experts(["a", "\n", "b"], np.array([1, 2, 3])),
        "bars": plots.plot_comparison_bars(few.assign(lo=few.perplexity - 1, hi=few.perplexity + 1), "perplexity",
                                           ci=("lo", "hi"), subtitle=sub),
        "experts_by_config": plots.plot_experts_by_config(few, subtitle=sub),
        "reduction": plots.plot_reduction(few, subtitle=sub),
        "reduction_by_task": plots.plot_reduction(runs.assign(task=runs.dataset), subtitle=sub),
        "load_cv": plots.plot_load_cv(load_frame, subtitle=sub),
        "load_cv_bars": plots.plot_load_cv(few, value="load_cv", layer="no_such_column"),
        "utilisation": rplots.plot_expert_utilization(load, subtitle=sub),
        "utilisation_share": rplots.plot_expert_utilization(load, normalize="share"),
        "coactivation": rplots.plot_coactivation(analysis.coactivation(indices, 16, normalize="jaccard")[0]),
        "boxes": plots.plot_paired_boxplots(prompts, unit="prompt", ylabel="NLL per prompt", subtitle=sub),
        "diff_hist": plots.plot_difference_histogram(base, base + rng.normal(0.1, 0.2, 30), subtitle=sub),
        "diff_hist_zero": plots.plot_difference_histogram(base, base),
        "alpha_maxk": plots.plot_alpha_maxk_heatmap(wiki[wiki.strategy == "bh"], subtitle=sub),
        "saturation": plots.plot_saturation(wiki[wiki.strategy == "bh"], subtitle=sub),
        "by_category": plots.plot_experts_by_category(prompts, subtitle=sub),
        "experts_vs_latency": plots.plot_experts_vs_latency(wiki, subtitle=sub),
    }


def test_every_figure_renders_with_labelled_axes(tmp_path):
    for name, fig in _figures().items():
        for ax in fig.axes:
            if hasattr(ax, "_colorbar"):  # a colorbar labels one axis only
                continue
            assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: unlabelled axis"
        assert fig._suptitle is not None and fig._suptitle.get_text(), f"{name}: no title"
        path = plots.save(fig, tmp_path / "sub" / f"{name}.png")
        assert path.exists() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subtitle_and_export_resolution(tmp_path):
    from matplotlib import image

    fig = plots.plot_pareto(_runs(), subtitle="OLMoE-1B-7B · WikiText-2 · α grid")
    assert "OLMoE-1B-7B · WikiText-2" in fig._suptitle.get_text()
    normal = image.imread(plots.save(fig, tmp_path / "p.png"))
    high = image.imread(plots.export(fig, tmp_path / "p_300.png"))
    assert high.shape[0] == pytest.approx(2 * normal.shape[0], rel=0.05)


def test_pareto_plot_draws_the_frontier_through_frontier_points():
    runs = _runs()
    fig = plots.plot_pareto(runs)
    for ax, (dataset, frame) in zip(fig.axes, runs.groupby("dataset")):
        line = next(l for l in ax.get_lines() if l.get_label() == "Pareto frontier")
        front = frame.iloc[plots.pareto_front(frame[["mean_experts", "perplexity"]].to_numpy())]
        assert list(line.get_xdata()) == front["mean_experts"].tolist()
        assert ax.get_title() == f"dataset: {dataset}"


# --------------------------------------------------------------------------- figure properties


def _legends(fig):
    return [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def _overlaps_data(fig):
    """(figure, axes) pairs whose legend box intersects the axes' data area, after a real layout."""
    fig.draw_without_rendering()
    bad = []
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None and legend.get_window_extent().overlaps(ax.get_window_extent()):
            bad.append(ax)
    return bad


def test_no_legend_sits_over_the_data():
    with_legend = 0
    for name, fig in _figures().items():
        assert not _overlaps_data(fig), f"{name}: a legend overlaps its axes"
        with_legend += bool(_legends(fig))
    assert with_legend >= 10  # the check ran on real legends, not on figures without any


def test_experts_by_category_legend_is_outside_and_names_each_configuration():
    prompts = pd.DataFrame({"label": np.repeat(["native top-8", "BH α=0.05"], 40),
                            "category": np.tile(["code", "prose", "math", "chat"], 20),
                            "experts": np.random.default_rng(1).uniform(1, 8, 80)})
    fig = plots.plot_experts_by_category(prompts)
    (legend,) = _legends(fig)
    assert [t.get_text() for t in legend.get_texts()] == ["native top-8", "BH α=0.05"]
    assert not _overlaps_data(fig)
    assert legend.get_window_extent().x0 >= fig.axes[0].get_window_extent().x1  # beside, to the right


def _saturation_runs(max_ks=(8.0, 64.0)):
    rows = []
    for max_k in max_ks:   # float knobs, as they come back from a JSON results file
        for alpha, mean in ((0.01, 3.7), (0.05, 5.0), (0.2, 6.6)):
            rows.append(dict(alpha=alpha, max_k=max_k, mean_experts=min(mean, max_k), ceiling_rate=0.1))
    return pd.DataFrame(rows)


def test_saturation_axis_is_scaled_from_the_data_not_to_max_k():
    fig = plots.plot_saturation(_saturation_runs())
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 6.6 < high < 10, high   # 3.7 vs 6.6 fill the axis; the max_k = 64 ceiling does not
    assert low == 0.0
    dashed = [l.get_ydata()[0] for l in ax.get_lines() if l.get_linestyle() == "--"]
    assert dashed == [8.0]         # the in-range ceiling is drawn, the one above the axis only named
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["max_k = 8", "max_k = 64 (ceiling above the axis)"]


def test_knob_labels_print_whole_numbers_as_ints():
    assert [plots.knob(v) for v in (8.0, 8, np.int64(64), 0.05, 1.5, "zscore")] == ["8", "8", "64", "0.05", "1.5",
                                                                                    "zscore"]
    runs = _saturation_runs().assign(temperature=1.0)
    figs = [plots.plot_saturation(runs), plots.plot_sensitivity(runs, "alpha", hue="max_k"),
            plots.plot_alpha_maxk_heatmap(runs)]
    for fig in figs:
        for legend in _legends(fig):
            for text in legend.get_texts():
                assert ".0" not in text.get_text(), text.get_text()


def test_wide_bar_charts_are_capped_and_name_their_colours():
    rng = np.random.default_rng(2)
    runs = pd.DataFrame({"label": [f"run {i}" for i in range(200)],
                         "strategy": np.resize(["topk", "bh", "top_p"], 200),
                         "mean_experts": rng.uniform(1, 8, 200)})
    fig = plots.plot_experts_by_config(runs)
    assert fig.get_figwidth() <= plots.MAX_WIDTH
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["native k = 8", "topk", "bh", "top_p"]
    assert not _overlaps_data(fig)


def test_pareto_quality_axis_is_log_only_when_values_span_decades():
    runs = _runs()
    wiki = runs[runs.dataset == "wikitext"].copy()
    assert plots.plot_pareto(wiki, dataset=None).axes[0].get_yscale() == "linear"
    wiki.loc[wiki.index[:2], "perplexity"] = [60_000.0, 45_000.0]   # a few collapsed configurations
    assert plots.plot_pareto(wiki, dataset=None).axes[0].get_yscale() == "log"
    assert plots.plot_pareto(wiki, dataset=None, logy=False).axes[0].get_yscale() == "linear"
    assert plots.spans_decades([1, 5, 9]) is False and plots.spans_decades([0, 100]) is False
