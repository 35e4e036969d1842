"""Held-out checks of the p-values' validity on a real model: calibrate on one text, test on another.

The null is the one the calibrated p-values are built for: on a held-out token, the experts the
native top-k does *not* route to. A valid p-value has P(p <= q) <= q for every q on that null; the
calibrated ones promise it per expert, under exchangeability of the held-out text with the
calibration text (see ``bh_routing.pvalues``). These functions measure how far that holds:

* :func:`calibration_quality`: per layer, the one-sided KS distance of the null p-values from the
  uniform (``ks_excess``: the largest P(p <= q) - q; 0 when conservative) and the ratio P(p <= q)/q
  at a few q; per expert, the same ratios, so the worst experts can be named.
* :func:`false_discovery_proportion`: the share of a strategy's *test* discoveries (before the min_k
  floor fills) that fall outside the native top-k, per layer.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .pvalues import compute_pvalues
from .selection import build_router

QUANTILES = (0.001, 0.01, 0.05)


def native_mask(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, N] bool: True where the native top-k (by probability, as the model routes) selects."""
    top = torch.topk(torch.softmax(router_logits.float(), dim=-1), top_k, dim=-1).indices
    return torch.zeros(router_logits.shape, dtype=torch.bool).scatter_(1, top, True)


def calibration_quality(router_logits: Sequence[torch.Tensor], calibration, model: str = "empirical",
                        quantiles: Sequence[float] = QUANTILES, worst: int = 5, temperature: float = 1.0,
                        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out null p-values of ``model`` on ``router_logits[layer]`` [T, N] (text the calibration
    did not see) → (per layer, worst experts). ``temperature``: for the models it applies to (softmax).

    Per layer: ``n_null`` (null p-values), ``ks`` (two-sided KS distance from uniform),
    ``ks_excess`` (max over the null p-values of F(q) - q: how anti-conservative at worst),
    ``ratio@q`` (P(p <= q)/q; <= 1 is valid), ``expert_ratio_min/max@q`` (the range over experts at
    the middle q). Worst experts: the ``worst`` experts of each layer with the largest ratio at the
    middle q, with their null counts."""
    from scipy import stats
    quantiles = sorted(quantiles)
    middle = quantiles[len(quantiles) // 2]
    layers, experts = [], []
    for layer, logits in enumerate(router_logits):
        p = compute_pvalues(logits, model, layer, calibration, temperature).double()  # [T, N]
        null = ~native_mask(logits, calibration.top_k)  # [T, N]
        values = np.sort(p[null].numpy())
        ecdf_after = np.arange(1, values.size + 1) / values.size
        row = {"layer": layer, "n_null": int(values.size), "ks": float(stats.kstest(values, "uniform").statistic),
               "ks_excess": float(max(0.0, (ecdf_after - values).max()))}
        per_expert_null = null.sum(dim=0).double()  # [N]
        for q in quantiles:
            row[f"ratio@{q:g}"] = float((values <= q).mean() / q)
            hits = ((p <= q) & null).sum(dim=0).double()
            ratio = (hits / per_expert_null.clamp(min=1) / q).numpy()  # [N]
            if q == middle:
                row[f"expert_ratio_min@{q:g}"], row[f"expert_ratio_max@{q:g}"] = float(ratio.min()), float(ratio.max())
                for e in np.argsort(-ratio)[:worst]:
                    experts.append({"layer": layer, "expert": int(e), "n_null": int(per_expert_null[e]),
                                    f"ratio@{q:g}": float(ratio[e])})
        layers.append(row)
    return pd.DataFrame(layers), pd.DataFrame(experts)


def false_discovery_proportion(config: Mapping, router_logits: Sequence[torch.Tensor], calibration=None,
                               top_k: int | None = None) -> list[float]:
    """Per layer, the mean over tokens of V/max(R, 1) for the step-up *test's* discoveries of a bh/by
    ``config`` (R: rejections clamped to max_k, the min_k floor left out; V: those outside the native
    top-k) on held-out ``router_logits``."""
    if config.get("strategy") not in ("bh", "by"):
        raise ValueError(f"false discoveries are defined for the bh/by tests, not {config.get('strategy')!r}")
    top_k = top_k or calibration.top_k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resolution warnings: the count is what it is
        router = build_router({**config, "min_k": 0}, calibration)  # the test's discoveries, no floor
    fdp = []
    for layer, logits in enumerate(router_logits):
        routing = router(logits, layer)
        false = (routing.mask & ~native_mask(logits, top_k).gather(1, routing.indices)).sum(dim=1)
        fdp.append(float((false / routing.counts.clamp(min=1)).mean()))
    return fdp
