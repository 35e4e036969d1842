"""Metrics as lm-evaluation-harness defines them (lm_eval/api/metrics.py), defined once."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# ==================================================================================================
# Metrics: lm_eval/api/metrics.py, defined once
# ==================================================================================================

def mean(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's `mean_stderr`: sample standard deviation / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def perplexity(logprobs: Sequence[float]) -> float:
    """lm-eval's `perplexity` aggregation: exp(-mean of per-item log-likelihoods)."""
    return math.exp(-mean(logprobs))


def weighted_perplexity(logprobs: Sequence[float], weights: Sequence[float]) -> float:
    """lm-eval's `weighted_perplexity`: exp(-sum(ll) / sum(units)); units = words, bytes or tokens."""
    return math.exp(-_total(logprobs) / _total(weights))


def bits_per_byte(logprobs: Sequence[float], n_bytes: Sequence[float]) -> float:
    """lm-eval's `bits_per_byte`: -sum(ll) / sum(bytes) / ln 2."""
    return -_total(logprobs) / _total(n_bytes) / math.log(2)


def _total(values: Sequence[float]) -> float:
    return float(np.asarray(values, dtype=np.float64).sum())


