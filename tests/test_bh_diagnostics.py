"""bh_routing.bh_diagnostics and routing_plots: BH on one token against statsmodels, p-value
diagnostics, patch vs analyze, and the figures (prompts under a routing: test_prompts.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bh_routing import bh_diagnostics as bhd, deep_dive_readings, native_routing as native
from bh_routing import routing_plots as rplots, session as sessions
from bh_routing.pvalues import compute_pvalues
from bh_routing.selection import route
from conftest import make_routing_sample, needs_tiny, random_calibration

pytestmark = pytest.mark.usefixtures("offline_hub")



@pytest.mark.parametrize("procedure", ["bh", "by"])
@pytest.mark.parametrize("pvalues", ["empirical", "zscore", "pooled"])
def test_bh_explain_matches_statsmodels(procedure, pvalues):
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    calibration, _ = random_calibration()
    g = torch.Generator().manual_seed(3)
    checked = 0
    for t in range(40):
        row = torch.randn(64, generator=g) + torch.linspace(-1, 1, 64)
        strong = torch.randperm(64, generator=g)[:t % 11]
        row[strong] += 3.0 + torch.rand(len(strong), generator=g) * 3  # 0-10 clearly relevant experts
        alpha = (0.01, 0.05, 0.2)[t % 3]
        e = bhd.bh_explain(row, 1, alpha, pvalues, calibration, procedure=procedure, min_k=1, max_k=8)
        p = compute_pvalues(row[None], pvalues, 1, calibration)[0].double().numpy()
        reject = multitest.multipletests(p, alpha=alpha, method=f"fdr_{procedure}")[0]
        assert e.k_star == int(reject.sum())
        assert set(e.table.loc[e.table["bh"], "expert"]) == set(np.flatnonzero(reject))
        assert e.router_agrees
        assert e.k_selected == min(max(e.k_star, 1), 8)
        assert list(e.table["pvalue"]) == sorted(e.table["pvalue"])
        routing = route(row[None], {"strategy": procedure, "alpha": alpha, "pvalues": pvalues, "max_k": 8}, layer=1,
                        calibration=calibration)
        assert set(e.table.loc[e.table["selected"], "expert"]) == set(routing.indices[0, :int(routing.counts[0])].tolist())
        checked += 1 <= e.k_star <= 8
    assert checked >= 5  # the cases that are not just the floor were exercised


def test_pvalue_diagnostics_and_alpha_curve():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    calibration, logits = random_calibration()
    fresh = [l[:300] for l in random_calibration(seed=5)[1]]
    table, smallest = bhd.pvalue_diagnostics(fresh, calibration, alpha=0.05)
    assert set(table["pvalues"]) == {"softmax", "pooled", "empirical", "zscore"}
    softmax = table[table["pvalues"] == "softmax"]
    assert (softmax["reach_rate"] == 0).all() and (softmax["floor_rate"] == 1).all()  # 1 - prob ~ 0.98 > alpha/N
    row = table[(table["pvalues"] == "empirical") & (table["layer"] == 0)].iloc[0]
    p = compute_pvalues(fresh[0], "empirical", 0, calibration).double().numpy()
    raw = [multitest.multipletests(r, alpha=0.05, method="fdr_bh")[0].sum() for r in p]
    assert row["bh_k_raw"] == pytest.approx(np.mean(raw))
    assert row["reach_rate"] == pytest.approx((p.min(axis=1) <= 0.05 / 64).mean())
    assert smallest["empirical"].shape == (2 * 300,)
    curve = bhd.alpha_curve(fresh, calibration, alphas=(0.01, 0.05, 0.2, 0.5), models=("empirical", "zscore"))
    for (model, layer), frame in curve.groupby(["pvalues", "layer"]):
        assert frame.sort_values("alpha")["mean_experts"].is_monotonic_increasing
    one = curve[(curve.pvalues == "zscore") & (curve.alpha == 0.2) & (curve.layer == 1)].iloc[0]
    counts = route(fresh[1], {"strategy": "bh", "pvalues": "zscore", "alpha": 0.2}, layer=1).counts
    assert one["mean_experts"] == pytest.approx(counts.float().mean().item())
    reach = deep_dive_readings.alpha_reaching(curve, targets=(2.0,))
    for r in reach.itertuples():
        means = curve[curve.pvalues == r.pvalues].groupby("alpha")["mean_experts"].mean()
        hit = means[means >= 2.0]
        assert (math.isnan(r.alpha) and hit.empty) or r.alpha == hit.index.min()


def test_subsample_keeps_the_same_tokens_in_every_layer():
    layers = [torch.arange(100.0)[:, None].expand(100, 4) + 1000 * l for l in range(3)]
    sub = bhd.subsample(layers, 10, seed=1)
    assert all(s.shape == (10, 4) for s in sub)
    np.testing.assert_array_equal(sub[0][:, 0].numpy() + 2000, sub[2][:, 0].numpy())
    assert bhd.subsample(layers, 500) == layers


# --------------------------------------------------------------------------- sweep tables


@needs_tiny
def test_patch_vs_analyze_and_reroute():
    from bh_routing.prompt_sets import prompt_set
    from bh_routing.models import load_model
    model, tokenizer = load_model("tiny", verbose=False)
    prompts = prompt_set("baseline")
    modes = bhd.patch_vs_analyze(model, tokenizer, prompts[2]["prompt"], {"strategy": "bh", "alpha": 0.05, "pvalues": "zscore"})
    assert modes["max_abs_diff_analyze"] == 0.0 and modes["max_abs_diff_restored"] == 0.0
    assert modes["max_abs_diff_patch"] > 0.0
    fig, info = bhd.reroute(model, tokenizer, prompts[1]["prompt"], None, 0.05, 1.0, "zscore")
    assert 1 <= info["mean_experts"] <= 8 and len(info["next_bh"]) == 5


def test_figures_render(tmp_path):
    sample = make_routing_sample()
    calibration, _ = random_calibration()
    row = torch.randn(64, generator=torch.Generator().manual_seed(0)) + torch.linspace(-1, 1, 64)
    explanation = bhd.bh_explain(row, 0, 0.05, "empirical", calibration)
    _, smallest = bhd.pvalue_diagnostics([row[None].repeat(20, 1)], calibration)
    figures = [rplots.plot_logit_distributions(sample), rplots.plot_entropy_across_layers(sample),
               rplots.plot_concentration(native.concentration(sample, (1, 2))), rplots.plot_mass_left_out(sample),
               rplots.plot_domain_usage(native.domain_usage(sample, 0), 0), rplots.plot_bh_explained(explanation),
               rplots.plot_smallest_pvalues(smallest, 0.05, 64), rplots.plot_count_heatmap(["a", "b"], np.array([[1, 2], [3, 4]]))]
    for i, fig in enumerate(figures):
        path = sessions.show(fig, tmp_path / f"f{i}.png")
        assert path.stat().st_size > 1000
