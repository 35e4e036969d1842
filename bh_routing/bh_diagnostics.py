"""BH routing explained and checked (notebook 02): the step-up procedure on one token, why naive
p-values fail, the α map of every p-value model, patch vs analyze, and live re-routing for the
sliders. (Prompts under a routing: ``bh_routing.prompts``.)"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .pvalues import PVALUE_MODELS


# =========================================================================== BH explained (notebook 02)


@dataclass
class BhExplanation:
    table: pd.DataFrame  # one row per expert, by increasing p-value (ties: larger logit first)
    alpha: float
    procedure: str
    pvalues: str
    layer: int
    k_star: int  # largest k with p_(k) <= c_k (0 if none): what the test alone selects
    k_selected: int  # after the [min_k, max_k] clamp: what the router uses
    min_k: int
    max_k: int
    router_agrees: bool  # the router's own selection is the table's "selected" set

    def markdown(self) -> str:
        floor = (f"; the test alone selects {self.k_star}, so the min_k floor adds "
                 f"{self.k_selected - self.k_star} expert(s) by router logit" if self.k_selected > self.k_star else "")
        ceiling = (f"; the test selects {self.k_star}, clamped to max_k = {self.max_k}" if self.k_star > self.max_k else "")
        native = int(self.table["native"].sum())
        overlap = int((self.table["native"] & self.table["selected"]).sum())
        return (f"Layer {self.layer}, `{self.pvalues}` p-values, {self.procedure.upper()} at α = {self.alpha}: "
                f"k* = **{self.k_star}**, selected **{self.k_selected}** expert(s){floor}{ceiling}; "
                f"{overlap} of them are among the native top-{native}. "
                f"Smallest p-value {self.table['pvalue'].iloc[0]:.3g} vs the first critical value "
                f"{self.table['critical'].iloc[0]:.3g}.")


def bh_explain(router_logits: torch.Tensor, layer: int, alpha: float = 0.05, pvalues: str = "empirical",
               calibration=None, temperature: float = 1.0, procedure: str = "bh", min_k: int = 1, max_k: int = 8,
               top_k: int = 8) -> BhExplanation:
    """The step-up procedure on one token's router logits [N], as a table: rank, expert, logit,
    probability, p-value, critical value c_k ((k/N)·α for BH; ÷ Σ1/i for BY), whether p_(k) <= c_k,
    ``bh`` (rank <= k*), ``selected`` (what the router actually uses, after the min_k/max_k clamp and
    its floor rule) and ``native`` (in the native top-k)."""
    from .pvalues import compute_pvalues
    from .selection import route, smallest_k_order, stepup_critical_values
    logits = router_logits.detach().float().reshape(1, -1).cpu()
    n = logits.shape[1]
    p = compute_pvalues(logits, pvalues, layer, calibration, temperature)  # [1, N] float32
    order = smallest_k_order(p, n, logits)[0]
    critical = stepup_critical_values(n, alpha, procedure).numpy()
    sorted_p = p[0, order].double().numpy()
    below = sorted_p <= critical
    k_star = int(np.flatnonzero(below).max() + 1) if below.any() else 0
    config = {"strategy": procedure, "alpha": alpha, "pvalues": pvalues, "min_k": min_k, "max_k": max_k}
    if temperature != 1.0:
        config["temperature"] = temperature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resolution warnings: the table shows the p-values anyway
        routing = route(logits, config, layer=layer, calibration=calibration)
    chosen = set(routing.indices[0, :int(routing.counts[0])].tolist())
    probs = torch.softmax(logits[0].double(), dim=-1)
    native = set(torch.topk(probs, top_k).indices.tolist())
    experts = order.tolist()
    table = pd.DataFrame({"rank": np.arange(1, n + 1), "expert": experts, "logit": logits[0, order].numpy(),
                          "prob": probs[order].numpy(), "pvalue": sorted_p, "critical": critical,
                          "below_line": below, "bh": np.arange(1, n + 1) <= k_star,
                          "selected": [e in chosen for e in experts], "native": [e in native for e in experts]})
    k_selected = int(routing.counts[0])
    # The router's rule: p-values above the largest critical value carry no evidence (count as 1),
    # so the min_k floor fills by router logit after the p-values under it.
    truncated = torch.where(p.double() <= float(critical[-1]), p, torch.ones_like(p))
    fill = smallest_k_order(truncated, n, logits)[0].tolist()
    agrees = chosen == set(fill[:min(max(k_star, min_k), max_k)]) and k_selected == len(chosen)
    return BhExplanation(table, alpha, procedure, pvalues, layer, k_star, k_selected, min_k, max_k, bool(agrees))


def pvalue_diagnostics(router_logits: Sequence[torch.Tensor], calibration=None, alpha: float = 0.05,
                       models: Sequence[str] = PVALUE_MODELS, max_k: int = 8,
                       ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Why naive p-values fail, on the model's own logits. Per p-value model and layer:
    ``min_p_median`` (median over tokens of the smallest of the N p-values), ``reach_rate`` (share of
    tokens whose smallest p-value is <= α/N, i.e. BH can select at least one expert on its own),
    ``bh_k_raw`` (mean experts BH selects with no floor and no cap), ``mean_experts``/``floor_rate``
    (the ``bh`` strategy with min_k = 1, max_k = ``max_k``). Also {model: [L·T] smallest p per token}."""
    from .pvalues import CALIBRATED, compute_pvalues
    from .selection import bh_select, route
    rows, smallest = [], {}
    for model in models:
        if model in CALIBRATED and calibration is None:
            continue
        mins = []
        for layer, logits in enumerate(router_logits):
            p = compute_pvalues(logits, model, layer, calibration)
            n = p.shape[1]
            low = p.min(dim=1).values
            raw = bh_select(p, alpha, min_k=0, max_k=n).counts.float()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                counts = route(logits, {"strategy": "bh", "pvalues": model, "alpha": alpha, "max_k": max_k},
                               layer=layer, calibration=calibration).counts
            rows.append({"pvalues": model, "layer": layer, "min_p_median": float(np.median(low.numpy())),
                         "reach_rate": float((low.double() <= alpha / n).float().mean()),
                         "bh_k_raw": float(raw.mean()), "mean_experts": float(counts.float().mean()),
                         "floor_rate": float((counts == 1).float().mean())})
            mins.append(low.numpy())
        smallest[model] = np.concatenate(mins)
    return pd.DataFrame(rows), smallest


def alpha_curve(router_logits: Sequence[torch.Tensor], calibration=None, alphas: Sequence[float] = (
        0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.50), models: Sequence[str] = PVALUE_MODELS,
        max_k: int = 8, min_k: int = 1, procedure: str = "bh") -> pd.DataFrame:
    """What BH *would* select on recorded native logits (analyze mode: later layers see native
    hidden states), per p-value model, α and layer: ``mean_experts``, ``floor_rate``, ``ceiling_rate``."""
    from .pvalues import CALIBRATED
    from .selection import build_router
    rows = []
    for model in models:
        if model in CALIBRATED and calibration is None:
            continue
        for alpha in alphas:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    router = build_router({"strategy": procedure, "pvalues": model, "alpha": alpha, "min_k": min_k,
                                           "max_k": max_k}, calibration)
                except ValueError:  # alpha below the calibration's resolution: only the floor
                    router = None
                for layer, logits in enumerate(router_logits):
                    counts = (router(logits, layer).counts if router is not None
                              else torch.full((logits.shape[0],), min_k))
                    rows.append({"pvalues": model, "alpha": alpha, "layer": layer,
                                 "mean_experts": float(counts.float().mean()),
                                 "floor_rate": float((counts == min_k).float().mean()),
                                 "ceiling_rate": float((counts == max_k).float().mean())})
    return pd.DataFrame(rows)


def subsample(router_logits: Sequence[torch.Tensor], max_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """The same evenly spread, seeded random subset of tokens from every layer's [T, N] logits."""
    total = router_logits[0].shape[0]
    if total <= max_tokens:
        return list(router_logits)
    keep = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_tokens].sort().values
    return [logits[keep.to(logits.device)] for logits in router_logits]


@torch.no_grad()
def patch_vs_analyze(model, tokenizer, text: str, config: Mapping, calibration=None) -> dict:
    """The same forward pass natively, under ``mode="analyze"`` and under ``mode="patch"``, and once
    more after both patches are gone: max |Δ logits| of each against native (analyze and restore must
    be exactly 0), and the experts per token each mode records."""
    from .patching import RoutingPatch
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)

    def forward():
        return model(input_ids=ids, use_cache=False).logits.float()
    native = forward()
    with RoutingPatch(model, dict(config), mode="analyze", calibration=calibration, verbose=False) as patch:
        analyzed = forward()
        k_analyze = patch.recorder.counts().astype(np.float64)
    with RoutingPatch(model, dict(config), mode="patch", calibration=calibration, verbose=False) as patch:
        patched = forward()
        k_patch = patch.recorder.counts().astype(np.float64)
    restored = forward()
    return {"tokens": int(ids.shape[1]),
            "max_abs_diff_analyze": float((analyzed - native).abs().max()),
            "max_abs_diff_patch": float((patched - native).abs().max()),
            "max_abs_diff_restored": float((restored - native).abs().max()),
            "mean_experts_analyze": float(k_analyze.mean()), "mean_experts_patch": float(k_patch.mean()),
            "same_next_token_patch": bool((patched[0, -1].argmax() == native[0, -1].argmax()).item())}


LIVE_SLIDERS = {"alpha": (1e-3, 1.0), "weights_temperature": (0.25, 5.0)}  # notebook 02's interactive ranges


@torch.no_grad()
def reroute(model, tokenizer, prompt: str, calibration=None, alpha: float = 0.05, weights_temperature: float = 1.0,
            pvalues: str = "empirical", max_k: int = 8, subtitle: str | None = None):
    """Route ``prompt`` with BH (patch mode) at α, mixing with weights softmax(logits / T_w) (the
    selection does not depend on T_w): (figure of experts per token, summary with mean experts and the
    next-token top-5 next to native top-8's). For the interactive sliders."""
    from .patching import RoutingPatch
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    config = {"strategy": "bh", "alpha": alpha, "pvalues": pvalues, "max_k": max_k}
    if weights_temperature != 1.0:
        config["weights_temperature"] = weights_temperature
    native = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with RoutingPatch(model, config, calibration=calibration, verbose=False) as patch:
            routed = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), dim=-1)
            counts = patch.recorder.counts()
    pieces = [tokenizer.decode([int(t)]) for t in ids[0]]
    from .routing_plots import plot_token_experts  # which imports this module
    fig = plot_token_experts(pieces, counts, min_k=1, max_k=max_k,
                             subtitle=subtitle or f"BH {pvalues} α={alpha} weights T={weights_temperature}")

    def top5(p):
        values, index = torch.topk(p, 5)
        return [f"{tokenizer.decode([int(i)])!r} {float(v):.3g}" for v, i in zip(values, index)]
    summary = {"alpha": alpha, "weights_temperature": weights_temperature, "mean_experts": float(counts.mean()),
               "floor_rate": float((counts == 1).mean()), "next_native": top5(native), "next_bh": top5(routed),
               "total_variation": float(0.5 * (native - routed).abs().sum())}
    return fig, summary
