"""Findings: paired tests against scipy, BH over the family, and synthetic sweeps with known null and
non-null differences (findings for the real ones, the false-finding rate of null sweeps at most α)."""
import math

import numpy as np
import pytest
from scipy import stats

from bh_routing import findings as fd

LOGLIK = fd.Outcome("logprob", "continuous", True, "article", "log-likelihood")
CORRECT = fd.Outcome("acc", "binary", True, "question", "accuracy")


def _compare(task, candidate, reference, outcome, k=(4.0, 8.0), matched=False, label="cand"):
    return fd.Comparison(task, label, "native top-8", outcome, np.asarray(candidate, float),
                         np.asarray(reference, float), candidate_k=k[0], reference_k=k[1], matched=matched)


def test_paired_tests_match_scipy():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=40)
    cand = ref + rng.normal(0.2, 1.0, size=40)
    got = fd.paired_test(ref, cand, "continuous")
    assert got["pvalue"] == pytest.approx(stats.ttest_rel(cand, ref).pvalue, rel=1e-12)
    half = stats.t.ppf(0.975, 39) * np.std(cand - ref, ddof=1) / math.sqrt(40)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((np.mean(cand - ref) - half, np.mean(cand - ref) + half))
    # binary: exact McNemar is the exact binomial test on the discordant pairs
    ref_b = rng.integers(0, 2, size=80)
    cand_b = np.where(rng.random(80) < 0.3, 1 - ref_b, ref_b)
    got = fd.paired_test(ref_b, cand_b, "binary")
    only_ref, only_cand = int(((ref_b == 1) & (cand_b == 0)).sum()), int(((ref_b == 0) & (cand_b == 1)).sum())
    assert got["pvalue"] == pytest.approx(stats.binomtest(only_cand, only_ref + only_cand).pvalue, rel=1e-9)
    assert got["effect"] == pytest.approx((only_cand - only_ref) / 80)


def test_ties_are_never_better():
    values = np.array([1.0, 0, 1, 1, 0, 0, 1, 0])
    found = fd.assess([_compare("t", values, values, CORRECT), _compare("w", np.ones(8) * 3, np.ones(8) * 3, LOGLIK)])
    assert [f.verdict for f in found] == ["no difference detected"] * 2
    assert all(f.pvalue == 1.0 for f in found) and "no difference detected at n = 8" in found[0].statement


def test_n_needed_matches_the_normal_approximation():
    # n ≈ ((z_{1-α/2} + z_power) / d)² + z²/2 (Guenther's correction for the t distribution)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    for d in (0.1, 0.3, 0.5):
        assert abs(fd.n_needed(d) - ((z / d) ** 2 + stats.norm.ppf(0.975) ** 2 / 2)) <= 2
    assert fd.n_needed(0.0) is None and fd.n_needed(math.inf) is None


def test_chance_check_uses_clopper_pearson():
    correct = np.r_[np.ones(17), np.zeros(43)]                      # 17 of 60: 0.283 on a 4-way task
    check = fd.chance_check("hellaswag", "acc_norm", correct, 0.25)
    assert check.ci_low == pytest.approx(stats.beta.ppf(0.025, 17, 44)) and check.at_chance
    assert "at chance on this model: no conclusion" in check.statement
    assert not fd.chance_check("hellaswag", "acc_norm", np.r_[np.ones(40), np.zeros(20)], 0.25).at_chance
    assert fd.chance_check("lambada", "acc", np.zeros(60), 0.0).at_chance    # 0 of 60 on an open vocabulary


def test_at_chance_tasks_and_unmatched_comparisons_leave_the_family():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=50)
    big = ref + rng.normal(2.0, 0.5, size=50)                         # an unmistakable improvement
    found = fd.assess([_compare("hellaswag", np.ones(50), np.zeros(50), CORRECT),
                       _compare("wikitext", big, ref, LOGLIK, k=(2.09, 2.0), matched=True),      # more experts
                       _compare("wikitext", big, ref, LOGLIK, k=(1.80, 2.0), matched=True),      # fewer experts
                       _compare("wikitext", big, ref, LOGLIK, k=(2.03, 2.0), matched=True)],     # within tolerance
                      at_chance=("hellaswag",))
    assert [f.verdict for f in found] == ["at chance", "not matched", "better with fewer experts", "better"]
    assert found[2].family_size == 2 and math.isnan(found[1].pvalue)


def _sweep(rng, effects, n=60, binary=False):
    """One synthetic sweep: per-item values of a reference and one candidate per effect size
    (Cohen's d for continuous items; a shift of the success probability for binary ones)."""
    comparisons = []
    if binary:
        p = 0.6
        ref = (rng.random(n) < p).astype(float)
        for j, shift in enumerate(effects):
            # flip a random share of items towards (or away from) correct: a paired shift of `shift`
            flip_up = (ref == 0) & (rng.random(n) < max(shift, 0) / (1 - p) + 0.1)
            flip_down = (ref == 1) & (rng.random(n) < max(-shift, 0) / p + 0.1 * (1 - p) / p)
            cand = np.where(flip_up, 1.0, np.where(flip_down, 0.0, ref))
            comparisons.append(_compare("binary", cand, ref, CORRECT, label=f"c{j}"))
        return comparisons
    ref = rng.normal(size=n)
    for j, d in enumerate(effects):
        cand = ref + rng.normal(d, 1.0, size=n)
        comparisons.append(_compare("continuous", cand, ref, LOGLIK, label=f"c{j}"))
    return comparisons


def test_null_sweeps_make_findings_at_most_at_the_nominal_rate():
    """Under the global null BH keeps P(any finding) <= α; uncorrected tests would not."""
    rng = np.random.default_rng(2024)
    replicates, family = 600, 8
    any_finding = any_uncorrected = 0
    for r in range(replicates):
        sweep = _sweep(rng, [0.0] * (family // 2)) + _sweep(rng, [0.0] * (family // 2), binary=True)
        found = fd.assess(sweep, power=None)
        any_finding += any(f.is_finding for f in found)
        any_uncorrected += any(f.pvalue <= fd.ALPHA for f in found)
    rate, se = any_finding / replicates, math.sqrt(fd.ALPHA * (1 - fd.ALPHA) / replicates)
    assert rate <= fd.ALPHA + 2.5 * se, rate
    assert any_uncorrected / replicates > 2 * fd.ALPHA    # the family is large enough for correction to matter


def test_real_differences_are_found_and_nulls_are_not():
    rng = np.random.default_rng(7)
    replicates, false, missed, nulls = 200, 0, 0, 0
    for _ in range(replicates):
        effects = [0.0, 0.0, 0.0, 0.8, -0.8]                        # d = ±0.8 at n = 60: power ≈ 1
        found = fd.assess(_sweep(rng, effects) + _sweep(rng, [0.0, 0.0, 0.3], binary=True), power=None)
        for f, effect in zip(found, effects + [0.0, 0.0, 0.3]):
            if effect == 0:
                nulls += 1
                false += f.is_finding
        missed += found[3].verdict != "better" or found[4].verdict != "worse"
    assert missed <= replicates * 0.02
    assert false / nulls <= fd.ALPHA                               # false findings among true nulls


def test_binary_shift_is_found():
    rng = np.random.default_rng(3)
    hits = sum(fd.assess(_sweep(rng, [0.3], n=200, binary=True), power=None)[0].verdict == "better"
               for _ in range(50))
    assert hits >= 45


def test_bad_comparisons_are_refused():
    with pytest.raises(ValueError, match="not paired"):
        _compare("t", np.ones(3), np.ones(4), LOGLIK)
    with pytest.raises(ValueError, match="other than 0/1"):
        _compare("t", np.full(3, 0.5), np.ones(3), CORRECT)
    with pytest.raises(ValueError, match="kind"):
        fd.Outcome("x", "ordinal", True, "item")
