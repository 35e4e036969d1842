"""P-value models and calibration against numpy/scipy references."""
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
