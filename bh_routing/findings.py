"""Findings: paired per-item comparisons turned into statements a reviewer can sign.

A report compares routing configurations on the same items (articles, questions, documents). Each
:class:`Comparison` holds both configurations' per-item values; :func:`assess` tests every
comparison of a report as one family and returns one :class:`Finding` each:

* **paired test per comparison** — continuous per-item values (log-likelihoods): paired t-test
  (scipy); binary per-item values (correct / not): exact McNemar test (statsmodels; the exact
  binomial test on the discordant pairs);
* **Benjamini–Hochberg over the family** (statsmodels ``multipletests``): a comparison is a finding
  only when its BH-adjusted p-value is at most ``alpha``; everything else reads "no difference
  detected at n = …" with, where an effect was observed, the n a paired t-test would need to detect
  it with 80 % power (before correction);
* **effect size, CI and n** with every statement: mean paired difference (candidate − reference,
  in the per-item value's units) with its t-based CI, and Cohen's d_z;
* **ties are never "better"**: zero differences give p = 1;
* **matched compute only within a stated tolerance**: a ``matched`` comparison whose mean experts
  differ by more than ``k_tolerance`` is not tested as matched; when the candidate uses *fewer*
  experts it is still tested, and a significant win is stated as "better with fewer experts";
* **chance levels**: :func:`chance_check` says whether the reference's accuracy is within its
  (Clopper–Pearson) CI of chance — such a task gives "at chance on this model: no conclusion" and
  its comparisons are left out of the family.

Nothing here tests a quantity that a configuration fixes by construction (e.g. mean experts between
α levels): callers pass only measured outcomes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.proportion import proportion_confint

ALPHA = 0.05          # false discovery rate of a report's findings
POWER = 0.8           # for "n needed"
K_TOLERANCE = 0.05    # matched compute: |k̄_candidate − k̄_reference| at most this many experts per token
KINDS = ("continuous", "binary")
SUPPORTED = ("better", "worse", "better with fewer experts", "worse with fewer experts")  # verdicts that are findings
VERDICTS = SUPPORTED + ("no difference detected", "not matched", "at chance")


@dataclass(frozen=True)
class Outcome:
    """What one per-item value is: ``column`` of the items table, ``kind`` (continuous or binary),
    its direction, and the pairing ``unit`` (what one pair is: an article, a question, ...)."""
    column: str
    kind: str
    higher_is_better: bool
    unit: str
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Outcome.kind must be one of {KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class Comparison:
    """Candidate vs reference on the same items, in the same order (``*_values`` [n])."""
    task: str
    candidate: str
    reference: str
    outcome: Outcome
    candidate_values: np.ndarray
    reference_values: np.ndarray
    candidate_k: float = math.nan
    reference_k: float = math.nan
    matched: bool = False   # True: a compute-matched comparison (mean experts should agree)

    def __post_init__(self):
        c, r = np.asarray(self.candidate_values, float), np.asarray(self.reference_values, float)
        if c.shape != r.shape or c.ndim != 1:
            raise ValueError(f"{self.task}: {self.candidate!r} vs {self.reference!r} are not paired "
                             f"({c.shape} vs {r.shape} values)")
        if self.outcome.kind == "binary" and not np.isin(np.concatenate([c, r]), (0.0, 1.0)).all():
            raise ValueError(f"{self.task}: binary outcome {self.outcome.column!r} holds values other than 0/1")


@dataclass
class Finding:
    """The tested comparison: ``verdict`` is one of VERDICTS; ``statement`` says it in a sentence."""
    comparison: Comparison
    verdict: str
    n: int
    test: str = ""
    pvalue: float = math.nan
    p_adjusted: float = math.nan
    effect: float = math.nan        # mean(candidate − reference) in the outcome's units
    ci_low: float = math.nan
    ci_high: float = math.nan
    cohens_dz: float = math.nan
    n_needed: int | None = None
    family_size: int = 0
    k_tolerance: float = K_TOLERANCE

    @property
    def is_finding(self) -> bool:
        return self.verdict in SUPPORTED

    @property
    def statement(self) -> str:
        c, o = self.comparison, self.comparison.outcome
        who = f"**{c.candidate}** (k̄ = {c.candidate_k:.2f}) vs {c.reference} (k̄ = {c.reference_k:.2f})"
        what = o.description or o.column
        if self.verdict == "at chance":
            return f"{c.task}: {who}: reference at chance on this model: no conclusion."
        if self.verdict == "not matched":
            return (f"{c.task}: {who}: not compute-matched (|Δk̄| > {self.k_tolerance:g}) and not cheaper: "
                    "no matched-compute conclusion.")
        evidence = (f"Δ {what} = {self.effect:+.4g} [{self.ci_low:+.4g}, {self.ci_high:+.4g}] per {o.unit}, "
                    f"n = {self.n} {o.unit}s, {self.test}, BH-adjusted p = {self.p_adjusted:.3g} "
                    f"(family of {self.family_size})")
        if self.is_finding:
            return f"{c.task}: {who}: **{self.verdict}**; {evidence}."
        needed = (f"; n ≈ {self.n_needed:,} {o.unit}s would detect the observed effect with "
                  f"{POWER:.0%} power" if self.n_needed else "")
        return f"{c.task}: {who}: no difference detected at n = {self.n} {o.unit}s ({evidence}{needed})."

    def as_row(self) -> dict:
        c = self.comparison
        return {"task": c.task, "candidate": c.candidate, "reference": c.reference, "matched": c.matched,
                "candidate_k": c.candidate_k, "reference_k": c.reference_k, "outcome": c.outcome.column,
                "unit": c.outcome.unit, "n": self.n, "test": self.test, "effect": self.effect,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "cohens_dz": self.cohens_dz,
                "pvalue": self.pvalue, "p_adjusted": self.p_adjusted, "verdict": self.verdict,
                "n_needed": self.n_needed, "family_size": self.family_size}


# --------------------------------------------------------------------------- one comparison


def paired_test(reference, candidate, kind: str, confidence: float = 0.95) -> dict:
    """Two-sided paired test of candidate vs reference. Returns ``test, pvalue, effect`` (mean of
    candidate − reference), ``ci_low, ci_high`` (t-based CI of that mean; the Wald-type interval
    for binary values), ``cohens_dz`` and ``n``. Zero differences give p = 1 (a tie is no evidence)."""
    r, c = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    diff = c - r
    n = diff.size
    if n < 2:
        raise ValueError(f"a paired test needs at least 2 items, got {n}")
    mean, sd = float(diff.mean()), float(diff.std(ddof=1))
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    out = {"n": n, "effect": mean, "ci_low": mean - half, "ci_high": mean + half,
           "cohens_dz": mean / sd if sd > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))}
    if kind == "binary":
        worse_only = int(((r == 1) & (c == 0)).sum())    # discordant pairs
        better_only = int(((r == 0) & (c == 1)).sum())
        table = [[0, worse_only], [better_only, 0]]      # concordant cells do not enter the exact test
        pvalue = 1.0 if worse_only + better_only == 0 else float(mcnemar(table, exact=True).pvalue)
        return out | {"test": "exact McNemar", "pvalue": min(pvalue, 1.0)}
    if kind != "continuous":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if sd == 0:
        pvalue = 1.0 if mean == 0 else 0.0
    else:
        pvalue = float(stats.ttest_rel(c, r).pvalue)
    return out | {"test": "paired t", "pvalue": pvalue}


def n_needed(cohens_dz: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Items a two-sided paired t-test needs to detect an effect of ``cohens_dz`` (None when no
    effect was observed or it is infinite)."""
    if not math.isfinite(cohens_dz) or cohens_dz == 0:
        return None
    n = TTestPower().solve_power(effect_size=abs(cohens_dz), alpha=alpha, power=power, alternative="two-sided")
    return int(math.ceil(n))


@dataclass(frozen=True)
class ChanceCheck:
    """Is the reference's accuracy within its CI of chance? (Clopper–Pearson, two-sided)."""
    task: str
    metric: str
    chance: float
    accuracy: float
    ci_low: float
    ci_high: float
    n: int

    @property
    def at_chance(self) -> bool:
        return self.ci_low <= self.chance

    @property
    def statement(self) -> str:
        where = (f"{self.metric} {self.accuracy:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] at n = {self.n}, "
                 f"chance {self.chance:.3g}")
        if self.at_chance:
            return f"{self.task}: **at chance on this model: no conclusion** ({where})."
        return f"{self.task}: above chance ({where})."


def chance_check(task: str, metric: str, correct, chance: float, confidence: float = 0.95) -> ChanceCheck:
    """``correct`` [n] 0/1 per item of the reference configuration."""
    correct = np.asarray(correct, dtype=np.float64)
    hits, n = int(correct.sum()), int(correct.size)
    low, high = proportion_confint(hits, n, alpha=1 - confidence, method="beta")
    return ChanceCheck(task, metric, chance, hits / n, float(low), float(high), n)


# --------------------------------------------------------------------------- the family


def assess(comparisons: Sequence[Comparison], alpha: float = ALPHA, k_tolerance: float = K_TOLERANCE,
           at_chance: Sequence[str] = (), power: float | None = POWER) -> list[Finding]:
    """Test every comparison; BH over the ones eligible to yield a finding; one Finding each, in order.

    Not tested (and so not in the family): comparisons on a task in ``at_chance``, and matched
    comparisons whose candidate uses more than ``k_tolerance`` experts per token more than the
    reference. ``power=None`` skips the "n needed" computation."""
    findings: list[Finding] = []
    tested: list[int] = []
    for comparison in comparisons:
        n = int(np.asarray(comparison.candidate_values).size)
        if comparison.task in at_chance:
            findings.append(Finding(comparison, "at chance", n))
            continue
        gap = comparison.candidate_k - comparison.reference_k
        if comparison.matched and not gap <= k_tolerance:   # NaN k̄ is not matched either
            findings.append(Finding(comparison, "not matched", n, k_tolerance=k_tolerance))
            continue
        result = paired_test(comparison.reference_values, comparison.candidate_values, comparison.outcome.kind)
        findings.append(Finding(comparison, "", n, test=result["test"], pvalue=result["pvalue"],
                                effect=result["effect"], ci_low=result["ci_low"], ci_high=result["ci_high"],
                                cohens_dz=result["cohens_dz"], k_tolerance=k_tolerance))
        tested.append(len(findings) - 1)
    if tested:
        adjusted, reject = bh_adjust([findings[i].pvalue for i in tested], alpha)
        for i, significant, p_adjusted in zip(tested, reject, adjusted):
            f = findings[i]
            c = f.comparison
            f.p_adjusted, f.family_size = float(p_adjusted), len(tested)
            if significant and f.effect != 0:
                improves = (f.effect > 0) == c.outcome.higher_is_better
                cheaper = c.matched and abs(c.candidate_k - c.reference_k) > k_tolerance
                f.verdict = ("better" if improves else "worse") + (" with fewer experts" if cheaper else "")
            else:
                f.verdict = "no difference detected"
                f.n_needed = n_needed(f.cohens_dz, alpha, power) if power else None
    return findings


def bh_adjust(pvalues, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini–Hochberg over one family: (adjusted p-values, rejected at FDR ``alpha``)."""
    reject, adjusted, _, _ = multipletests(np.asarray(pvalues, dtype=np.float64), alpha=alpha, method="fdr_bh")
    return adjusted, reject


def across_groups(values, groups) -> dict:
    """Do ``values`` [n] differ across ``groups`` [n] (e.g. a document's mean experts across domains)?
    Kruskal–Wallis (scipy), robust to the skew of count means; ``means`` per group for the statement."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups)
    names = list(dict.fromkeys(groups.tolist()))
    samples = [values[groups == name] for name in names]
    if len(names) < 2 or np.ptp(values) == 0:
        pvalue = 1.0          # one group, or every value equal: nothing can differ
    else:
        pvalue = float(stats.kruskal(*samples).pvalue)
    return {"test": "Kruskal–Wallis", "n": int(values.size), "groups": len(names), "pvalue": pvalue,
            "means": {name: float(sample.mean()) for name, sample in zip(names, samples)}}
