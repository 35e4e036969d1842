"""Selection kernels against independent references (statsmodels, numpy brute force, simulation)."""
import math

import numpy as np
import pytest
import torch

from bh_routing import PAD_INDEX, Calibration, bh_select, build_router, compute_pvalues, route
from bh_routing.selection import entropy_buckets, normalised_entropy

multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests

ALPHAS = [0.01, 0.05, 0.1, 0.2, 0.5]


def _selected_sets(routing):
    mask = routing.mask.cpu().numpy()
    indices = routing.indices.cpu().numpy()
    return [set(indices[t][mask[t]].tolist()) for t in range(indices.shape[0])]


def _mixed_pvalues(rows, n, seed, dtype=torch.float64):
    """Nulls uniform, a random share of signals concentrated near 0, some rows with ties."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(rows, n, generator=g, dtype=torch.float64)
    signal = torch.rand(rows, n, generator=g) < torch.rand(rows, 1, generator=g) * 0.5
    p = torch.where(signal, p ** 8, p)
    tied = torch.rand(rows, 1, generator=g) < 0.1  # discretised rows: many exact ties
    p = torch.where(tied, torch.ceil(p * 50) / 50, p)
    return p.to(dtype)


@pytest.mark.parametrize("num_experts", [8, 64, 128])
@pytest.mark.parametrize("procedure,method", [("bh", "fdr_bh"), ("by", "fdr_by")])
def test_stepup_equals_statsmodels(num_experts, procedure, method):
    rows = 10_000
    for dtype in (torch.float64, torch.float32):
        p = _mixed_pvalues(rows, num_experts, seed=num_experts, dtype=dtype)
        p_np = p.double().numpy()
        for alpha in ALPHAS:
            routing = bh_select(p, alpha, procedure=procedure, min_k=0, max_k=num_experts)
            got = _selected_sets(routing)
            for t in range(rows):
                reject = multipletests(p_np[t], alpha=alpha, method=method)[0]
                expected = set(np.flatnonzero(reject).tolist())
                assert got[t] == expected, (dtype, alpha, t)
            assert routing.counts.tolist() == [len(s) for s in got]


def test_clamp_fills_and_cuts_in_pvalue_order_with_logit_tiebreak():
    rows, n, alpha = 2000, 64, 0.1
    p = _mixed_pvalues(rows, n, seed=7, dtype=torch.float32)
    logits = torch.randn(rows, n)
    unclamped = bh_select(p, alpha, min_k=0, max_k=n).counts
    min_k, max_k = 2, 6
    routing = bh_select(p, alpha, min_k=min_k, max_k=max_k, tiebreak=logits)
    assert torch.equal(routing.counts, unclamped.clamp(min_k, max_k))
    for t in range(rows):
        # numpy reference order: p ascending, then logit descending, then index ascending
        order = np.lexsort((np.arange(n), -logits[t].numpy(), p[t].numpy()))
        c = int(routing.counts[t])
        assert routing.indices[t, :c].tolist() == order[:c].tolist()
        assert (routing.indices[t, c:] == PAD_INDEX).all() and (routing.weights[t, c:] == 0).all()
        assert (routing.weights[t, :c] == 1).all()


def _strategy_reference(logits, p, alpha, procedure, min_k, max_k):
    """numpy: k* from statsmodels on the dense p-values; order = p-values <= c_N ascending, ties to
    the larger logit then the lower index, then every other expert by logit (the documented floor)."""
    n = logits.shape[1]
    c_n = alpha if procedure == "bh" else alpha / np.sum(1.0 / np.arange(1, n + 1))
    method = {"bh": "fdr_bh", "by": "fdr_by"}[procedure]
    expected = []
    for row_p, row_logits in zip(p.double().numpy(), logits.float().numpy()):
        k = int(np.clip(multipletests(row_p, alpha=alpha, method=method)[0].sum(), min_k, max_k))
        truncated = np.where(row_p <= c_n, row_p, 1.0)
        expected.append(np.lexsort((np.arange(n), -row_logits, truncated))[:k].tolist())
    return expected


@pytest.mark.parametrize("pvalues", ["empirical", "pooled", "zscore", "softmax"])
def test_stepup_strategies_equal_dense_reference(pvalues):
    """The strategies compute only the p-values <= c_N (tail_stepup); a dense numpy reference on
    every p-value must choose the same experts in the same order, with ties in p and in logits."""
    g = torch.Generator().manual_seed(11)
    bias = torch.randn(64, generator=g)
    calibration = Calibration.from_router_logits([torch.randn(4000, 64, generator=g) + bias], top_k=8,
                                                 max_samples_per_expert=1500)
    logits = torch.randn(600, 64, generator=g) + bias
    logits[::3] = torch.round(logits[::3] * 4) / 4  # many exactly equal logits (and so equal p-values)
    logits[1::7, :5] += 4 * torch.rand(1, 5, generator=g) + 2  # strong signals: large k*
    logits[2::11] = bias.min() - 3  # flat, weak rows: nothing significant, the floor fills by logit
    logits = logits * (3.0 if pvalues == "softmax" else 1.0)
    p = compute_pvalues(logits, pvalues, 0, calibration)
    for procedure in ("bh", "by"):
        for alpha, min_k, max_k in ((0.05, 0, 64), (0.2, 1, 8), (0.5, 3, 6), (1.0, 8, 8), (0.01, 2, 64)):
            if pvalues == "softmax" and alpha < 0.5:
                alpha = 0.99  # softmax p-values sit near 1: only a large alpha reaches them
            config = {"strategy": procedure, "alpha": alpha, "pvalues": pvalues, "min_k": min_k, "max_k": max_k}
            routing = route(logits, config, layer=0, calibration=calibration)
            expected = _strategy_reference(logits, p, alpha, procedure, min_k, max_k)
            assert routing.counts.tolist() == [len(e) for e in expected], config
            for t, chosen in enumerate(expected):
                assert routing.indices[t, :len(chosen)].tolist() == chosen, (config, t)
                assert (routing.indices[t, len(chosen):] == PAD_INDEX).all()


def test_bh_controls_fdr_in_simulation():
    """Nulls uniform, 8 signals per token shifted by 3 sd: realised FDR <= alpha within MC error."""
    tokens, n, signals, alpha = 4000, 64, 8, 0.1
    g = torch.Generator().manual_seed(0)
    z = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    z[:, :signals] += 3.0
    p = 0.5 * torch.erfc(z / math.sqrt(2.0))
    routing = bh_select(p, alpha, min_k=0, max_k=n)
    mask = routing.mask
    false = ((routing.indices >= signals) & mask).sum(1).double()
    rejected = routing.counts.double()
    fdp = false / rejected.clamp(min=1)
    fdr, se = fdp.mean().item(), fdp.std().item() / math.sqrt(tokens)
    assert fdr <= alpha * (n - signals) / n + 3 * se
    power = (((routing.indices < signals) & mask).sum(1).double() / signals).mean().item()
    assert power > 0.2
    by = bh_select(p, alpha, procedure="by", min_k=0, max_k=n)
    assert (by.counts <= routing.counts).all()  # BY is the more conservative procedure


def test_topk_reproduces_native_olmoe_routing():
    logits = torch.randn(3000, 64) * 2
    routing = route(logits, {"strategy": "topk", "k": 8})
    # OLMoE (norm_topk_prob=False): softmax over all experts in fp32, top-8, no renormalisation
    probs = torch.nn.functional.softmax(logits, dim=1, dtype=torch.float)
    weights, indices = torch.topk(probs, 8, dim=-1)
    assert torch.equal(routing.indices, indices)
    assert torch.equal(routing.weights, weights)
    assert (routing.counts == 8).all()


def test_topk_matches_transformers_router_module():
    olmoe = pytest.importorskip("transformers.models.olmoe.modeling_olmoe")
    if not hasattr(olmoe, "OlmoeTopKRouter"):
        pytest.skip("transformers < 5 has no OlmoeTopKRouter module (4.x routing is tested by the patcher)")
    from transformers import OlmoeConfig
    torch.manual_seed(0)
    config = OlmoeConfig(hidden_size=32, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False)
    router = olmoe.OlmoeTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    hidden = torch.randn(500, 32)
    with torch.no_grad():
        out = router(hidden)
    _, hf_weights, hf_indices = out
    logits = torch.nn.functional.linear(hidden, router.weight)
    routing = route(logits, {"strategy": "topk", "k": 8})
    assert torch.equal(routing.indices, hf_indices)
    assert torch.allclose(routing.weights, hf_weights.float(), atol=0, rtol=0)


def _probs(logits, temperature=1.0):
    x = logits.double().numpy() / temperature
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_prefix_strategies_against_brute_force(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(600, 64, generator=g) * 1.5
    probs = _probs(logits, temperature)
    base = _probs(logits)
    min_k, max_k = 1, 8
    cases = {
        "threshold": ({"tau": 0.03}, lambda row: int((row > 0.03).sum())),
        "ratio": ({"beta": 0.4}, lambda row: int((row >= 0.4 * row.max()).sum())),
        "top_p": ({"p": 0.5}, None),
    }
    for name, (knob, count_rule) in cases.items():
        routing = route(logits, {"strategy": name, "min_k": min_k, "max_k": max_k,
                                 "temperature": temperature, **knob})
        for t in range(logits.shape[0]):
            row = probs[t]
            if name == "top_p":
                ordered, mass, count = np.sort(row)[::-1], 0.0, 0
                while mass < 0.5 and count < len(ordered):  # crossing expert included
                    mass += ordered[count]
                    count += 1
            else:
                count = count_rule(row)
            count = min(max(count, min_k), max_k)
            assert int(routing.counts[t]) == count, (name, t)
            chosen = routing.indices[t, :count].tolist()
            assert chosen == np.argsort(-base[t], kind="stable")[:count].tolist()
            np.testing.assert_allclose(routing.weights[t, :count].numpy(), base[t][chosen], rtol=1e-6)


def test_entropy_strategy_buckets_and_calibration():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4000, 64, generator=g) * torch.rand(4000, 1, generator=g) * 4
    ks = [2, 4, 6, 8]
    edges = entropy_buckets(logits, ks)
    routing = route(logits, {"strategy": "entropy", "ks": ks, "edges": edges, "min_k": 1, "max_k": 8})
    probs = _probs(logits)
    entropy = -(probs * np.log(probs)).sum(1) / math.log(64)
    expected = np.array(ks)[np.searchsorted(np.array(edges), entropy, side="left")]
    assert routing.counts.numpy().tolist() == expected.tolist()
    shares = np.bincount(np.searchsorted(ks, routing.counts.numpy()), minlength=4) / len(logits)
    np.testing.assert_allclose(shares, 0.25, atol=0.01)  # quantile edges: equal share per k
    np.testing.assert_allclose(normalised_entropy(logits.float()).numpy(), entropy, rtol=1e-5, atol=1e-6)


def test_weight_conventions():
    logits = torch.randn(50, 64)
    native = route(logits, {"strategy": "topk", "k": 4})
    renorm = route(logits, {"strategy": "topk_renorm", "k": 4})
    uniform = route(logits, {"strategy": "topk_uniform", "k": 4})
    torch.testing.assert_close(renorm.weights, native.weights / native.weights.sum(1, keepdim=True))
    assert torch.equal(uniform.weights, torch.full((50, 4), 0.25))
    deferred = route(logits, {"strategy": "topk", "k": 4}, model_renormalizes=True)
    torch.testing.assert_close(deferred.weights, renorm.weights)
    explicit = route(logits, {"strategy": "topk", "k": 4, "renormalize": False}, model_renormalizes=True)
    assert torch.equal(explicit.weights, native.weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pvalues", ["softmax", "zscore"])
def test_half_precision_logits_select_like_their_float32_upcast(dtype, pvalues):
    logits = torch.randn(3000, 64) * 3
    logits[:, :4] += 12  # four outlying experts per token
    logits = logits.to(dtype)
    config = {"strategy": "bh", "alpha": 0.2, "pvalues": pvalues, "min_k": 0, "max_k": 64}
    low, high = route(logits, config), route(logits.float(), config)
    assert torch.equal(low.indices, high.indices) and torch.equal(low.counts, high.counts)
    if pvalues == "zscore":  # p-values in float32, not floored at bf16's 2**-7 > alpha/64
        assert (compute_pvalues(logits, "zscore") < 2**-7).any()
        assert low.counts.float().mean() >= 3


def test_padding_is_documented_and_counts_bound_real_slots():
    routing = route(torch.randn(200, 64) * 3, {"strategy": "bh", "pvalues": "zscore", "alpha": 0.05,
                                                "min_k": 0, "max_k": 8})
    assert routing.indices.shape == (200, 8) and routing.indices.dtype == torch.long
    assert routing.counts.dtype == torch.long
    assert (routing.indices[~routing.mask] == PAD_INDEX).all()
    assert (routing.weights[~routing.mask] == 0).all()
    assert (routing.weights[routing.mask] > 0).all()


@pytest.mark.parametrize("config,match", [
    ({"strategy": "bh", "alpha": 0.0, "pvalues": "zscore"}, "alpha"),
    ({"strategy": "bh", "alpha": 1.5, "pvalues": "zscore"}, "alpha"),
    ({"strategy": "bh", "pvalues": "softmax", "temperature": 0}, "temperature"),
    ({"strategy": "top_p", "p": 0.5, "temperature": -1}, "temperature"),
    ({"strategy": "bh", "pvalues": "zscore", "min_k": -1}, "min_k"),
    ({"strategy": "bh", "pvalues": "zscore", "min_k": 5, "max_k": 4}, "min_k"),
    ({"strategy": "threshold", "tau": 0.1, "max_k": 65}, "exceeds the number of experts"),
    ({"strategy": "bh", "pvalues": "empirical"}, "needs a calibration"),
    ({"strategy": "nonsense"}, "unknown strategy"),
    ({"strategy": "bh", "pvalues": "zscore", "alhpa": 0.1}, "does not take"),
    ({"strategy": "topk", "k": 4, "max_k": 8}, "exactly k"),
    ({"strategy": "top_p"}, "needs 'p'"),
    ({"strategy": "threshold", "max_k": 8}, "needs 'tau'"),
    ({"strategy": "ratio"}, "needs 'beta'"),
    ({"strategy": "bh", "pvalues": "zscore", "weights_temperature": 0}, "weights_temperature"),
    ({"strategy": "topk_uniform", "k": 4, "weights_temperature": 2.0}, "uniform weights"),
])
def test_bad_configs_fail_clearly(config, match):
    with pytest.raises(ValueError, match=match):
        route(torch.randn(4, 64), config)


def test_non_finite_logits_fail_clearly():
    logits = torch.randn(4, 64)
    logits[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        route(logits, {"strategy": "topk"})
    with pytest.raises(ValueError, match="tokens, experts"):
        route(torch.randn(2, 3, 64), {"strategy": "topk"})


def test_router_is_reusable_and_keeps_its_config():
    config = {"strategy": "ratio", "beta": 0.5, "max_k": 4, "name": "ratio-0.5"}
    router = build_router(config)
    assert router.strategy == "ratio" and router.max_k == 4 and router.config == config
    logits = torch.randn(10, 64)
    assert torch.equal(router(logits).indices, route(logits, config).indices)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_gpu_matches_cpu():
    logits = torch.randn(4096, 64) * 2
    for config in ({"strategy": "topk"}, {"strategy": "bh", "pvalues": "zscore", "alpha": 0.2},
                   {"strategy": "top_p", "p": 0.6}):
        cpu, gpu = route(logits, config), route(logits.cuda(), config).to("cpu")
        assert torch.equal(cpu.indices, gpu.indices) and torch.equal(cpu.counts, gpu.counts)


@pytest.mark.parametrize("config", [{"strategy": "topk", "k": 4}, {"strategy": "top_p", "p": 0.4},
                                    {"strategy": "bh", "pvalues": "zscore", "alpha": 0.2}])
def test_weights_temperature_changes_weights_not_selection(config):
    logits = torch.randn(50, 64) * 2
    plain, hot = route(logits, config), route(logits, {**config, "weights_temperature": 2.0})
    assert torch.equal(plain.indices, hot.indices) and torch.equal(plain.counts, hot.counts)
    expected = torch.softmax(logits.double() / 2.0, dim=-1).gather(1, plain.indices) * plain.mask
    torch.testing.assert_close(hot.weights.double(), expected, rtol=1e-5, atol=1e-7)
