"""Matched compute: the knob (α, p, τ, β) with which an adaptive strategy uses a target mean number of
experts per token on calibration text, and the runs that compare every adaptive strategy at that k̄
with top-k at k = k̄ — the fair comparison (a strategy that simply uses more experts wins otherwise)."""
from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import numpy as np
import torch

from .experiments import Budget, Run
from .pvalues import Calibration, ResolutionError
from .selection import as_real, build_router

MEAN_K_TOLERANCE = 0.1  # experts per token: a farther "matched" knob is reported as unreachable
KNOBS = {  # strategy -> (knob, low, high, log-scale search, mean k increases with the knob)
    "bh": ("alpha", 1e-6, 1.0, True, True),
    "by": ("alpha", 1e-6, 1.0, True, True),
    "top_p": ("p", 1e-4, 1.0, False, True),
    "threshold": ("tau", 0.0, 0.999, False, False),
    "ratio": ("beta", 1e-4, 1.0, True, False),
}


def mean_experts(config: Mapping, router_logits: Sequence[torch.Tensor], calibration: Calibration | None = None,
                 layers: Sequence[int] | None = None) -> float:
    """Mean experts per token (over tokens and ``layers``) that ``config`` selects on recorded logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # p-value resolution warnings are expected at search extremes
        try:
            router = build_router(config, calibration)
        except ResolutionError:  # alpha below the p-value resolution: only the floor
            return float(config.get("min_k", 1))
        layers = range(len(router_logits)) if layers is None else layers
        return float(np.mean([router(router_logits[l], l).counts.float().mean().item() for l in layers]))


def calibrate_to_mean_k(config: Mapping, target_k: float, router_logits: Sequence[torch.Tensor],
                        calibration: Calibration | None = None, per_layer: bool = False,
                        iterations: int = 30) -> dict:
    """Find the knob (α, p, τ, β) with which ``config`` uses ``target_k`` experts per token on the
    calibration logits (``router_logits[layer]`` [T, N]), globally or per layer. Returns the config
    (or ``{"per_layer": {layer: config}}``) with ``achieved_k`` recorded under ``"calibrated"``."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a routing config dict, got {config!r}")
    strategy = config.get("strategy")
    if strategy not in KNOBS:
        raise ValueError(f"calibrate_to_mean_k supports {sorted(KNOBS)}, not {strategy!r}")
    target_k = as_real(target_k, "target_k")
    min_k, max_k = (as_real(config.get(bound, default), bound) for bound, default in (("min_k", 1), ("max_k", 8)))
    if not min_k <= target_k <= max_k:
        raise ValueError(f"target_k={target_k:g} is unreachable: {strategy} is clamped to [min_k, max_k] = "
                         f"[{min_k:g}, {max_k:g}] experts per token")
    if per_layer:
        return {"per_layer": {layer: calibrate_to_mean_k_layers(config, target_k, router_logits, calibration, [layer],
                                                                iterations) for layer in range(len(router_logits))},
                "strategy": strategy, "target_k": target_k}
    return calibrate_to_mean_k_layers(config, target_k, router_logits, calibration, None, iterations)


def calibrate_to_mean_k_layers(config, target_k, router_logits, calibration, layers, iterations) -> dict:
    knob, low, high, log_scale, increasing = KNOBS[config["strategy"]]
    best = None
    for _ in range(iterations):  # bisection on a monotone map knob -> mean k
        mid = math.sqrt(low * high) if log_scale and low > 0 else (low + high) / 2
        candidate = {**config, knob: mid}
        k = mean_experts(candidate, router_logits, calibration, layers)
        if best is None or abs(k - target_k) < abs(best[1] - target_k):
            best = (candidate, k)
        if (k < target_k) == increasing:
            low = mid
        else:
            high = mid
    candidate, k = best
    if abs(k - target_k) > MEAN_K_TOLERANCE:
        where = "all layers" if layers is None else f"layer(s) {list(layers)}"
        warnings.warn(f"calibrate_to_mean_k: {config['strategy']} reaches mean k {k:.3f}, not the target {target_k:g}, "
                      f"on {where} ({knob}={candidate[knob]:.4g} is the closest); the run will not be matched "
                      "in compute", stacklevel=3)
    return {**candidate, "calibrated": {"target_k": target_k, "achieved_k": round(k, 4), "knob": knob}}


MATCHED_ADAPTIVE = {  # matched compute: each strategy with its knob (KNOBS) searched for a mean k
    "BH empirical": {"strategy": "bh", "pvalues": "empirical", "max_k": 8},
    "BH zscore": {"strategy": "bh", "pvalues": "zscore", "max_k": 8},
    "top-p": {"strategy": "top_p", "max_k": 8}, "threshold": {"strategy": "threshold", "max_k": 8},
    "ratio": {"strategy": "ratio", "max_k": 8}}


def matched_compute(budget: Budget, router_logits: Sequence[torch.Tensor], calibration: Calibration,
                    tasks: Sequence[str] = ("wikitext",), targets=(2, 4, 6, 8), per_layer: bool = False) -> list[Run]:
    """Every adaptive strategy at the knob that gives mean k in ``targets`` on calibration text,
    beside top-k at the same k — the fair comparison."""
    runs = []
    for k in targets:
        configs = [(f"top-{k}", {"strategy": "topk", "k": k})]
        configs += [(f"{name} @k̄={k}", calibrate_to_mean_k(cfg, k, router_logits, calibration, per_layer))
                    for name, cfg in MATCHED_ADAPTIVE.items()]
        runs += [Run(label, cfg, task, budget.n_for(task), max_length=budget.max_length, group=f"matched k={k}")
                 for task in tasks for label, cfg in configs]
    return runs
