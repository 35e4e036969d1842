"""Routing metrics and paired statistics against independent references: scipy, published values,
hand formulas, Python sets and brute-force loops."""
import json
import math
import warnings
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from bh_routing import analysis

# Student's sleep data (Cushny & Peebles; R `sleep`): extra hours of sleep, two drugs, 10 patients.
SLEEP_DRUG1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_DRUG2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def _random_routing(seed, layers=3, tokens=40, experts=12, max_k=5, native_k=4, pad=-1):
    """Random variable-k routing: distinct experts per token, counts in [0, max_k], a few tokens
    not recorded in a layer (count -1), padded slots filled with ``pad``."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_k + 1, size=(layers, tokens))
    counts[rng.random((layers, tokens)) < 0.1] = -1
    indices = np.full((layers, tokens, max_k), pad)
    native = np.zeros((layers, tokens, native_k), dtype=np.int64)
    for layer in range(layers):
        for t in range(tokens):
            order = rng.permutation(experts)
            native[layer, t] = order[:native_k] if rng.random() < 0.5 else rng.permutation(experts)[:native_k]
            indices[layer, t, :max(counts[layer, t], 0)] = order[:max(counts[layer, t], 0)]
    return counts, indices, native


# --------------------------------------------------------------------------- paired tests


def test_paired_t_matches_published_sleep_result():
    # R: t.test(extra ~ group, data = sleep, paired = TRUE) -> t = -4.0621, df = 9, p = 0.002833,
    # 95 % CI (-2.4598858, -0.7001142), mean difference -1.58
    result = analysis.paired_comparison(SLEEP_DRUG2, SLEEP_DRUG1, unit="patient")
    assert result["unit"] == "patient" and result["n"] == 10
    assert result["mean_difference"] == pytest.approx(-1.58)
    assert result["t_statistic"] == pytest.approx(-4.0621, abs=1e-4)
    assert result["t_pvalue"] == pytest.approx(0.002833, abs=1e-6)
    assert result["ci_low"] == pytest.approx(-2.4598858, abs=1e-6)
    assert result["ci_high"] == pytest.approx(-0.7001142, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_tests_and_ci_match_scipy(seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 1.0, size=25)
    cand = base + rng.normal(0.3, 0.5, size=25)
    result = analysis.paired_comparison(base, cand, unit="prompt", confidence=0.9)
    t = stats.ttest_rel(cand, base)
    assert result["t_statistic"] == pytest.approx(t.statistic, rel=1e-12)
    assert result["t_pvalue"] == pytest.approx(t.pvalue, rel=1e-10)
    ci = t.confidence_interval(0.9)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
    w = stats.wilcoxon(cand - base)
    assert result["wilcoxon_statistic"] == w.statistic
    assert result["wilcoxon_pvalue"] == pytest.approx(w.pvalue, rel=1e-10)
    diff = cand - base
    hand_dz = diff.mean() / math.sqrt(((diff - diff.mean()) ** 2).sum() / (diff.size - 1))
    assert result["cohens_dz"] == pytest.approx(hand_dz, rel=1e-12)
    assert result["dz_ci_low"] < result["cohens_dz"] < result["dz_ci_high"]


def test_dz_interval_at_zero_effect_is_normal_quantile():
    # t = 0: P(T' <= 0; λ) = Φ(-λ) exactly, so the bounds are ±z_{(1+c)/2} / sqrt(n)
    low, high = analysis.cohens_dz_interval(0.0, 16, 0.95)
    z = stats.norm.ppf(0.975)
    assert (low, high) == pytest.approx((-z / 4, z / 4), abs=1e-8)


def test_dz_interval_close_to_large_sample_approximation():
    n, dz = 2000, 0.4  # normal approximation: d ± z · sqrt(1/n + d²/(2n))
    low, high = analysis.cohens_dz_interval(dz, n, 0.95)
    half = stats.norm.ppf(0.975) * math.sqrt(1 / n + dz**2 / (2 * n))
    assert low == pytest.approx(dz - half, abs=2e-3) and high == pytest.approx(dz + half, abs=2e-3)


def test_wilcoxon_drops_zero_differences_and_says_so():
    base = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    cand = base + np.array([0.0, 0.0, 0.5, -0.2, 0.9, 1.3, 0.4, 0.7])
    result = analysis.paired_comparison(base, cand)
    nonzero = (cand - base)[cand != base]
    w = stats.wilcoxon(nonzero)
    assert result["wilcoxon_n"] == 6
    assert result["wilcoxon_pvalue"] == pytest.approx(w.pvalue)
    assert any("2 zero" in note for note in result["notes"])


def test_identical_inputs_are_reported_not_crashed_on():
    x = np.arange(10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy RuntimeWarning leaks out either
        result = analysis.paired_comparison(x, x, unit="token")
    assert result["mean_difference"] == 0.0 and result["ci_low"] == result["ci_high"] == 0.0
    assert math.isnan(result["t_pvalue"]) and math.isnan(result["wilcoxon_pvalue"])
    assert math.isnan(result["cohens_dz"])
    assert result["notes"] and "zero" in result["notes"][0]


def test_constant_shift_gives_infinite_effect():
    x = np.arange(10.0)
    result = analysis.paired_comparison(x, x + 1.0)
    assert result["t_statistic"] == math.inf and result["t_pvalue"] == 0.0 and result["cohens_dz"] == math.inf


def test_nan_pairs_dropped_and_bad_input_rejected():
    base = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    cand = np.array([1.5, 2.1, 3.0, np.nan, 5.9])
    result = analysis.paired_comparison(base, cand)
    assert result["n"] == 3 and result["n_dropped"] == 2
    assert result["mean_difference"] == pytest.approx(np.mean([0.5, 0.1, 0.9]))
    with pytest.raises(ValueError):
        analysis.paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        analysis.paired_comparison([1.0], [2.0])


def test_unit_means_per_prompt():
    means = analysis.unit_means([1.0, 3.0, 10.0, 2.0], ["b", "b", "a", "c"])
    assert means.to_dict() == {"a": 10.0, "b": 2.0, "c": 2.0}


# --------------------------------------------------------------------------- bootstrap


def _logprobs(seed, n=3000):
    rng = np.random.default_rng(seed)
    base = -rng.gamma(2.0, 1.5, size=n)
    return base, base - rng.normal(0.05, 0.3, size=n)


def test_bootstrap_point_estimate_is_the_perplexity_ratio():
    base, cand = _logprobs(0)
    result = analysis.bootstrap_perplexity_ratio(base, cand, n_boot=200)
    ppl_b, ppl_c = math.exp(-np.mean(base)), math.exp(-np.mean(cand))
    assert result["ratio"] == pytest.approx(ppl_c / ppl_b, rel=1e-12)
    assert result["ppl_baseline"] == pytest.approx(ppl_b) and result["ppl_candidate"] == pytest.approx(ppl_c)
    assert result["ci_low"] <= result["ratio"] <= result["ci_high"]
    assert result["unit"] == "token" and result["n_units"] == result["n_tokens"] == base.size


def test_bootstrap_is_seeded():
    base, cand = _logprobs(1)
    a = analysis.bootstrap_perplexity_ratio(base, cand, n_boot=300, seed=7)
    b = analysis.bootstrap_perplexity_ratio(base, cand, n_boot=300, seed=7)
    c = analysis.bootstrap_perplexity_ratio(base, cand, n_boot=300, seed=8)
    assert a == b
    assert (a["ci_low"], a["ci_high"]) != (c["ci_low"], c["ci_high"])


def test_bootstrap_identical_inputs_ratio_exactly_one():
    base, _ = _logprobs(2)
    result = analysis.bootstrap_perplexity_ratio(base, base.copy(), n_boot=100, groups=np.arange(base.size) // 50)
    assert result["ratio"] == 1.0 and result["ci_low"] == 1.0 and result["ci_high"] == 1.0


def test_bootstrap_known_shift():
    base, _ = _logprobs(3)
    shift = 0.1  # every token loses 0.1 nats -> perplexity grows by exp(0.1)
    result = analysis.bootstrap_perplexity_ratio(base, base - shift, n_boot=100)
    assert result["ratio"] == pytest.approx(math.exp(shift), rel=1e-12)
    assert result["ci_low"] == pytest.approx(math.exp(shift), rel=1e-12)
    assert result["ci_high"] == pytest.approx(math.exp(shift), rel=1e-12)


def test_bootstrap_spread_matches_standard_error_even_in_small_blocks():
    base, cand = _logprobs(4, n=2000)
    diff = base - cand
    analytic_se = diff.std(ddof=1) / math.sqrt(diff.size)
    result = analysis.bootstrap_perplexity_ratio(base, cand, n_boot=1000, max_block=10_000)  # 5 per block
    assert result["log_ratio_se"] == pytest.approx(analytic_se, rel=0.1)


def test_group_bootstrap_sees_within_document_dependence():
    rng = np.random.default_rng(5)
    docs = np.repeat(np.arange(40), 50)
    base = -rng.gamma(2.0, 1.5, size=docs.size)
    cand = base - rng.normal(0.0, 0.3, size=40)[docs] - rng.normal(0.0, 0.05, size=docs.size)  # a shift per doc
    tokens = analysis.bootstrap_perplexity_ratio(base, cand, n_boot=500)
    grouped = analysis.bootstrap_perplexity_ratio(base, cand, n_boot=500, groups=docs, group_unit="document")
    assert grouped["unit"] == "document" and grouped["n_units"] == 40 and grouped["n_tokens"] == docs.size
    assert grouped["ratio"] == pytest.approx(tokens["ratio"], rel=1e-12)
    # document-level SE: sd of the per-document mean differences / sqrt(40) (equal sizes)
    per_doc = (base - cand).reshape(40, 50).mean(axis=1)
    assert grouped["log_ratio_se"] == pytest.approx(per_doc.std(ddof=1) / math.sqrt(40), rel=0.15)
    assert grouped["ci_high"] - grouped["ci_low"] > 3 * (tokens["ci_high"] - tokens["ci_low"])


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        analysis.bootstrap_perplexity_ratio([-1.0, -2.0], [-1.0])
    with pytest.raises(ValueError):
        analysis.bootstrap_perplexity_ratio([-1.0, -np.inf], [-1.0, -2.0])


# --------------------------------------------------------------------------- routing metrics


def test_experts_per_token_statistics():
    counts, _, _ = _random_routing(0)
    positions = np.arange(counts.shape[1]) % 7
    out = analysis.experts_per_token(counts, positions=positions, layers=[4, 5, 6])
    valid = counts[counts >= 0]
    assert out["overall"]["mean"] == pytest.approx(valid.mean())
    assert out["overall"]["std"] == pytest.approx(valid.std(ddof=1))
    assert out["overall"]["median"] == np.median(valid) and out["overall"]["n"] == valid.size
    row = out["per_layer"].set_index("layer").loc[5]
    layer = counts[1][counts[1] >= 0]
    assert (row["n"], row["mean"], row["min"], row["max"]) == (layer.size, pytest.approx(layer.mean()),
                                                              layer.min(), layer.max())
    pooled = [c for l in range(3) for t in range(counts.shape[1]) if positions[t] == 3 and (c := counts[l, t]) >= 0]
    row = out["per_position"].set_index("position").loc[3]
    assert row["mean"] == pytest.approx(np.mean(pooled)) and row["n"] == len(pooled)
    t = 11
    recorded = [counts[l, t] for l in range(3) if counts[l, t] >= 0]
    assert out["per_token"][t] == pytest.approx(np.mean(recorded))


def test_floor_and_ceiling_rates():
    counts = np.array([[1, 1, 2, 8, -1], [8, 8, 8, 3, 1]])
    frame = analysis.floor_ceiling_rates(counts, min_k=1, max_k=8)
    assert frame["floor_rate"].tolist() == pytest.approx([2 / 4, 1 / 5])
    assert frame["ceiling_rate"].tolist() == pytest.approx([1 / 4, 3 / 5])
    assert frame["n"].tolist() == [4, 5]


def _gini_pairwise(x):
    x = np.asarray(x, dtype=float)
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size**2 * x.mean())


def test_load_metrics_against_references():
    rng = np.random.default_rng(0)
    loads = rng.integers(0, 50, size=(4, 16)).astype(float)
    loads[1, :3] = 0  # dead experts
    loads[2] = 7.0  # perfectly balanced
    m = analysis.load_metrics(loads)
    for layer, x in enumerate(loads):
        assert m["gini"][layer] == pytest.approx(_gini_pairwise(x), abs=1e-12)
        assert m["entropy"][layer] == pytest.approx(stats.entropy(x), rel=1e-12)
        assert m["entropy_normalised"][layer] == pytest.approx(stats.entropy(x) / math.log(16), rel=1e-12)
        assert m["cv"][layer] == pytest.approx(np.std(x) / np.mean(x), rel=1e-12)
        assert m["max_mean_ratio"][layer] == pytest.approx(x.max() / x.mean())
        assert m["dead_experts"][layer] == (x == 0).sum()
    assert m["max_min_ratio"][1] == math.inf
    assert m["gini"][2] == 0.0 and m["cv"][2] == 0.0 and m["entropy_normalised"][2] == pytest.approx(1.0)
    one = analysis.load_metrics(np.r_[10.0, np.zeros(15)])
    assert one["gini"] == pytest.approx(15 / 16) and one["entropy"] == 0.0


@pytest.mark.parametrize("pad", [-1, 0])
def test_load_and_expert_load_against_counter(pad):
    counts, indices, _ = _random_routing(1, pad=pad)
    load = analysis.load_counts(indices, 12, counts=counts)
    for layer in range(counts.shape[0]):
        expected = Counter(int(e) for t in range(counts.shape[1]) for e in indices[layer, t, :max(counts[layer, t], 0)])
        assert load[layer].tolist() == [expected.get(e, 0) for e in range(12)]
    frame = analysis.expert_load(indices, 12, counts=counts, layers=[0, 1, 2])
    assert frame["assignments"].tolist() == np.clip(counts, 0, None).sum(axis=1).tolist()
    assert frame["gini"].tolist() == pytest.approx([_gini_pairwise(x) for x in load])


def test_mask_conventions_agree():
    counts, indices, _ = _random_routing(2, pad=-1)
    by_sign = analysis.load_counts(indices, 12)  # recorder: -1 padding, no counts needed
    padded0 = np.where(indices < 0, 0, indices)  # Routing: PAD_INDEX = 0, needs counts or mask
    mask = np.arange(indices.shape[2])[None, None, :] < counts[:, :, None]
    assert (analysis.load_counts(padded0, 12, counts=counts) == by_sign).all()
    assert (analysis.load_counts(padded0, 12, mask=mask) == by_sign).all()
    with pytest.raises(ValueError):
        analysis.load_counts(indices, 5)  # expert ids up to 11


def test_overlap_against_python_sets():
    counts, indices, native = _random_routing(3)
    per = analysis.overlap_per_token(indices, native, counts=counts)
    frame = analysis.overlap_with_native(indices, native, counts=counts)
    for layer in range(counts.shape[0]):
        recalls, precisions, jaccards = [], [], []
        for t in range(counts.shape[1]):
            if counts[layer, t] < 0:
                assert not per["valid"][layer, t]
                continue
            chosen = set(indices[layer, t, :counts[layer, t]].tolist())
            nat = set(native[layer, t].tolist())
            inter = len(chosen & nat)
            assert per["intersection"][layer, t] == inter
            assert per["recall"][layer, t] == pytest.approx(inter / len(nat))
            assert per["jaccard"][layer, t] == pytest.approx(inter / len(chosen | nat))
            recalls.append(inter / len(nat))
            jaccards.append(inter / len(chosen | nat))
            if chosen:
                assert per["precision"][layer, t] == pytest.approx(inter / len(chosen))
                precisions.append(inter / len(chosen))
            else:
                assert math.isnan(per["precision"][layer, t])
        assert frame["recall"][layer] == pytest.approx(np.mean(recalls))
        assert frame["precision"][layer] == pytest.approx(np.mean(precisions))
        assert frame["jaccard"][layer] == pytest.approx(np.mean(jaccards))


def test_overlap_with_itself_is_perfect():
    _, _, native = _random_routing(4)
    frame = analysis.overlap_with_native(native, native)
    assert (frame["recall"] == 1).all() and (frame["jaccard"] == 1).all() and (frame["precision"] == 1).all()


def test_coactivation_against_brute_force():
    counts, indices, _ = _random_routing(5)
    co = analysis.coactivation(indices, 12, counts=counts)
    expected = np.zeros((3, 12, 12))
    for layer in range(3):
        for t in range(counts.shape[1]):
            chosen = indices[layer, t, :max(counts[layer, t], 0)]
            for i in chosen:
                for j in chosen:
                    expected[layer, i, j] += 1
    assert (co == expected).all()
    cond = analysis.coactivation(indices, 12, counts=counts, normalize="conditional")
    jac = analysis.coactivation(indices, 12, counts=counts, normalize="jaccard")
    i, j = 2, 7
    for layer in range(3):
        a, b, both = expected[layer, i, i], expected[layer, j, j], expected[layer, i, j]
        assert cond[layer, i, j] == pytest.approx(both / a)
        assert jac[layer, i, j] == pytest.approx(both / (a + b - both))


def test_native_topk_matches_sorting():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 5, 16))
    top = analysis.native_topk(logits, 4)
    for layer in range(2):
        for t in range(5):
            assert top[layer, t].tolist() == sorted(range(16), key=lambda e: -logits[layer, t, e])[:4]


def test_summarize_routing_is_json_and_consistent():
    counts, indices, native = _random_routing(7)
    summary = analysis.summarize_routing(counts, indices, num_experts=12, native_indices=native, min_k=0, max_k=5)
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN / inf
    valid = counts[counts >= 0]
    assert summary["experts_mean"] == pytest.approx(valid.mean())
    assert summary["reduction_pct"] == pytest.approx(100 * (1 - valid.mean() / 4))  # native_k from native width
    assert summary["floor_rate"] == pytest.approx((valid == 0).mean())
    assert summary["ceiling_rate"] == pytest.approx((valid == 5).mean())
    load = analysis.expert_load(indices, 12, counts=counts)
    assert summary["load_gini"] == pytest.approx(load["gini"].mean())
    per = analysis.overlap_per_token(indices, native, counts=counts)
    assert summary["native_recall"] == pytest.approx(per["recall"][per["valid"]].mean())
    assert summary["n_layers"] == 3 and summary["n_tokens"] == 40
    top1 = analysis.summarize_routing(np.ones((1, 1), dtype=int), min_k=1, max_k=1)
    assert top1["experts_std"] is None  # one value: no sample SD, and None rather than NaN


def test_dz_interval_is_nan_not_an_error_where_scipy_cannot_evaluate_it():
    """n = 2 with a large effect: scipy's nct.cdf returns NaN in the far tail, the CI is undefined."""
    low, high = analysis.cohens_dz_interval(-4.02, 2)
    assert math.isnan(low) or math.isnan(high)
    result = analysis.paired_comparison([1.0, 2.0], [0.5, 1.45], unit="document")
    assert result["n"] == 2 and result["mean_difference"] == pytest.approx(-0.525)
