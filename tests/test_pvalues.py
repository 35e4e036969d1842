"""P-value models and calibration against numpy/scipy references."""
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from bh_routing import Calibration, compute_pvalues, route


def _calibration(layers=2, tokens=3000, experts=64, top_k=8, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(experts, generator=g)  # experts differ in their baseline affinity
    logits = [torch.randn(tokens, experts, generator=g) + bias for _ in range(layers)]
    return Calibration.from_router_logits(logits, top_k=top_k, **kw), logits


def test_empirical_null_is_the_experts_non_routed_logits():
    cal, logits = _calibration(max_samples_per_expert=10**9)
    for layer, x in enumerate(logits):
        routed = np.zeros(x.shape, bool)
        top = np.argsort(-x.numpy(), axis=1, kind="stable")[:, :8]
        np.put_along_axis(routed, top, True, axis=1)
        for e in (0, 17, 63):
            expected = np.sort(x.numpy()[~routed[:, e], e])
            n = int(cal.empirical_counts[layer, e])
            assert n == len(expected)
            np.testing.assert_array_equal(cal.empirical[layer, e, :n].numpy(), expected)
            assert torch.isinf(cal.empirical[layer, e, n:]).all()


@pytest.mark.parametrize("model", ["empirical", "pooled"])
def test_calibrated_pvalues_match_numpy_ecdf(model):
    cal, _ = _calibration(max_samples_per_expert=1000, max_samples_pooled=5000)
    x = torch.randn(300, 64) * 2
    x[0, :4] = cal.empirical[1, :4, 0]  # exact ties with null values: ">=" must count them
    p = compute_pvalues(x, model, layer=1, calibration=cal)
    assert p.dtype == torch.float32
    xs = x.numpy()
    for e in range(64):
        if model == "empirical":
            n = int(cal.empirical_counts[1, e])
            null = cal.empirical[1, e, :n].numpy()
        else:
            n = int(cal.pooled_counts[1])
            null = cal.pooled[1, :n].numpy()
        expected = (1 + (null[None, :] >= xs[:, e:e + 1]).sum(1)) / (n + 1)
        np.testing.assert_allclose(p[:, e].numpy(), expected, rtol=1e-6)
    assert (p > 0).all() and (p <= 1).all()


def test_empirical_pvalues_are_uniform_under_the_null():
    """A fresh draw of non-routed logits gets (super-)uniform p-values: P(p <= a) <= a."""
    cal, _ = _calibration(layers=1, tokens=20000, max_samples_per_expert=20000)
    g = torch.Generator().manual_seed(99)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(0))
    fresh = torch.randn(20000, 64, generator=g) + bias
    p = compute_pvalues(fresh, "empirical", layer=0, calibration=cal)
    routed = torch.zeros_like(fresh, dtype=torch.bool).scatter_(1, torch.topk(fresh, 8).indices, True)
    null_p = p[~routed].numpy()
    for a in (0.01, 0.05, 0.1, 0.5):
        assert (null_p <= a).mean() <= a + 3 * np.sqrt(a * (1 - a) / null_p.size)


def test_zscore_matches_scipy():
    x = torch.randn(200, 64) * 3 + 1
    p = compute_pvalues(x, "zscore")
    xs = x.double().numpy()
    med = np.median(xs, axis=1, keepdims=True)
    mad = np.median(np.abs(xs - med), axis=1, keepdims=True)
    expected = stats.norm.sf((xs - med) / (1.4826 * mad))
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-5, atol=1e-30)


def test_softmax_pvalues_and_why_they_fail():
    x = torch.randn(100, 64)
    p = compute_pvalues(x, "softmax")
    np.testing.assert_allclose(p.numpy(), 1 - torch.softmax(x, -1).numpy(), rtol=1e-6)
    # OLMoE-like flat router: p ~ 0.9 >> alpha/64, BH selects nothing before the min_k floor
    routing = route(x, {"strategy": "bh", "pvalues": "softmax", "alpha": 0.05, "min_k": 0})
    assert int(routing.counts.sum()) == 0


def test_calibration_file_round_trips_bit_for_bit(tmp_path):
    cal, _ = _calibration(metadata={"model": "test/model", "corpus": "random"})
    path = tmp_path / "calibration.safetensors"
    cal.save(path)
    loaded = Calibration.load(path)
    for name in ("empirical", "empirical_counts", "pooled", "pooled_counts"):
        a, b = getattr(cal, name), getattr(loaded, name)
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert loaded.top_k == cal.top_k and loaded.metadata == cal.metadata
    x = torch.randn(64, 64)
    assert torch.equal(compute_pvalues(x, "empirical", 0, cal), compute_pvalues(x, "empirical", 0, loaded))


def test_calibration_file_is_not_pickle(tmp_path):
    bogus = tmp_path / "x.safetensors"
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(bogus))
    with pytest.raises(ValueError, match="not a bh_routing calibration"):
        Calibration.load(bogus)


def test_calibration_subsampling_is_seeded():
    a, _ = _calibration(max_samples_per_expert=100, seed=3)
    b, _ = _calibration(max_samples_per_expert=100, seed=3)
    assert torch.equal(a.empirical, b.empirical) and int(a.empirical_counts.max()) == 100


def test_calibration_errors_are_clear():
    cal, _ = _calibration(layers=2)
    x = torch.randn(8, 64)
    with pytest.raises(ValueError, match="layer index"):
        compute_pvalues(x, "empirical", layer=None, calibration=cal)
    with pytest.raises(ValueError, match="outside the calibration's 2 layers"):
        compute_pvalues(x, "empirical", layer=5, calibration=cal)
    with pytest.raises(ValueError, match="32 experts"):
        compute_pvalues(torch.randn(8, 32), "empirical", layer=0, calibration=cal)
    small, _ = _calibration(tokens=50)
    with pytest.raises(ValueError, match="can never select"):
        route(x, {"strategy": "bh", "alpha": 0.01}, layer=0, calibration=small)
    with pytest.warns(UserWarning, match="resolution"):
        route(x, {"strategy": "bh", "alpha": 0.2}, layer=0, calibration=small)


def test_bh_with_empirical_pvalues_selects_more_than_softmax():
    cal, _ = _calibration(tokens=5000)
    x = torch.randn(1000, 64) + torch.randn(64, generator=torch.Generator().manual_seed(0))
    x[:, :6] += 4  # six clearly relevant experts per token
    config = {"strategy": "bh", "alpha": 0.05, "min_k": 0, "max_k": 64}
    empirical = route(x, {**config, "pvalues": "empirical"}, layer=0, calibration=cal)
    softmax = route(x, {**config, "pvalues": "softmax"})
    assert empirical.counts.float().mean() > 4 and softmax.counts.float().mean() < 1


def _tail_reference(cal, model, x, cutoff):
    """Dense p-values with everything above the cutoff dropped (what TailTable must return)."""
    p = compute_pvalues(x, model, layer=0, calibration=cal)
    keep = p <= torch.tensor(cutoff, dtype=torch.float32)
    return {(int(t), int(e)): float(p[t, e]) for t, e in keep.nonzero()}


@pytest.mark.parametrize("procedure,model,alpha", [
    ("by", "empirical", 3e-4), ("by", "empirical", 5e-4), ("by", "pooled", 1e-4), ("bh", "empirical", 1 / 8193),
    ("bh", "empirical", 1.3e-4)])
def test_the_resolution_band_neither_crashes_nor_misleads(procedure, model, alpha):
    """1/(n+1) between c_N and alpha used to crash TailTable.build; now: ResolutionError exactly when
    1/(n+1) > c_N (the procedure's largest critical value), otherwise the sparse tail equals the dense p-values."""
    from bh_routing.pvalues import ResolutionError, null_samples_needed
    from bh_routing.selection import stepup_critical_values
    cal, _ = _calibration(layers=1, tokens=10000)  # the default cap: 8192 null samples per expert
    n = int((cal.empirical_counts if model == "empirical" else cal.pooled_counts).max())
    c_n = float(stepup_critical_values(64, alpha, procedure)[-1])
    x = torch.randn(400, 64) * 3
    config = {"strategy": procedure, "pvalues": model, "alpha": alpha, "min_k": 0, "max_k": 64}
    if float(np.float32(1) / np.float32(n + 1)) > c_n:
        with pytest.raises(ResolutionError, match=f"c_N = {c_n:.3g}.*>= {null_samples_needed(c_n):,} null samples"):
            route(x, config, layer=0, calibration=cal)
    else:
        with pytest.warns(UserWarning, match="cannot select a single expert"):
            route(x, config, layer=0, calibration=cal)
    table = cal.tail_table(model, 0, c_n, torch.device("cpu"))  # built directly: never an index error
    tokens, experts, p = table.pvalues(x)
    assert {(int(t), int(e)): float(v) for t, e, v in zip(tokens, experts, p)} == _tail_reference(cal, model, x, c_n)


def test_by_warning_uses_by_critical_values():
    """n = 8192 (p >= 1.22e-4): BH's c_1 = 0.03/64 = 4.7e-4 is resolvable, BY's c_1 = 0.03/(64·H_64) = 9.9e-5 is not."""
    cal, _ = _calibration(layers=1, tokens=10000)
    x = torch.randn(8, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        route(x, {"strategy": "bh", "alpha": 0.03}, layer=0, calibration=cal)
    harmonic = sum(1 / i for i in range(1, 65))
    with pytest.warns(UserWarning, match=f"BY's smallest critical value c_1 = {0.03 / 64 / harmonic:.3g}"):
        route(x, {"strategy": "by", "alpha": 0.03}, layer=0, calibration=cal)


def test_calibration_requirement_closed_form():
    from bh_routing.pvalues import calibration_requirement
    harmonic = sum(1 / i for i in range(1, 65))
    need = calibration_requirement(0.01, "by", 64, 8, "empirical")
    assert need.critical_first == pytest.approx(0.01 / 64 / harmonic) and need.critical_last == pytest.approx(0.01 / harmonic)
    pooled = calibration_requirement(0.05, "bh", 64, 8, "pooled")
    for samples, critical in ((need.null_samples, need.critical_first), (need.null_samples_any, need.critical_last),
                              (pooled.null_samples, 0.05 / 64), (pooled.null_samples_any, 0.05)):
        # the smallest n whose float32 p-value 1/(n+1) passes the step-up's comparison (c rounded down to float32)
        c32 = np.float32(critical)
        c32 = np.nextafter(c32, np.float32(0)) if float(c32) > critical else c32
        assert float(np.float32(1) / np.float32(samples + 1)) <= float(c32) < float(np.float32(1) / np.float32(samples))
    assert need.tokens == int(np.ceil(need.null_samples / (1 - 8 / 64)))
    assert pooled.null_samples in (1279, 1280) and pooled.tokens == int(np.ceil(pooled.null_samples / 64))
    # a calibration of that size really resolves c_1: no warning
    cal, _ = _calibration(layers=1, tokens=need.tokens + 2000, max_samples_per_expert=need.null_samples)
    assert int(cal.empirical_counts.max()) >= need.null_samples


def test_calibrate_to_mean_k_bisects_through_the_resolution_band():
    from bh_routing.matching import calibrate_to_mean_k
    cal, logits = _calibration(layers=1, tokens=10000)
    found = calibrate_to_mean_k({"strategy": "by", "pvalues": "empirical"}, 1.2, logits, cal, iterations=40)
    assert 1.0 <= found["calibrated"]["achieved_k"] <= 1.6


@pytest.mark.parametrize("model", ["empirical", "pooled", "zscore"])
def test_temperature_is_refused_where_selection_is_temperature_invariant(model):
    cal, _ = _calibration(layers=1)
    with pytest.raises(ValueError, match="temperature-invariant.*weights_temperature"):
        route(torch.randn(4, 64), {"strategy": "bh", "pvalues": model, "temperature": 2.0}, layer=0, calibration=cal)


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65])
def test_zscore_row_median_is_numpys_for_every_row_length_and_ties(n):
    from bh_routing.pvalues import _median
    generator = torch.Generator().manual_seed(n)
    for x in (torch.randn(300, n, generator=generator, dtype=torch.float64),
              torch.randint(-3, 3, (300, n), generator=generator).double(),      # many ties
              torch.randn(300, n, generator=generator).to(torch.bfloat16)):     # sorted in its own dtype
        expected = torch.from_numpy(np.median(x.double().numpy(), axis=1))[:, None]
        assert torch.equal(_median(x), expected)
