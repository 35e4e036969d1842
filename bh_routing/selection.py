"""Routing strategies: router logits [T, N] -> Routing(weights [T, K], indices [T, K], counts [T]).

Pure tensor code (no transformers import), vectorised over tokens, one code path for CPU and GPU.

Contract shared by every strategy
---------------------------------
* Input: router logits ``[T, N]`` of any float dtype on any device. They are upcast to float32
  before anything else (p-values in bf16 would be floored at 2**-7 > alpha/64).
* Output: a :class:`Routing` with ``K = max_k`` slots per token. Slot ``j`` of token ``t`` is real
  iff ``j < counts[t]``; padded slots carry ``PAD_INDEX`` and weight 0, so they contribute nothing
  even to a kernel that does not look at ``counts`` (an in-range index never crashes or reads
  uninitialised rows, unlike an out-of-range sentinel).
* Selection vs weights: ``temperature`` only changes *which* experts are chosen, and only where the
  selection reads probabilities (top_p, threshold, ratio, entropy, and BH/BY on ``softmax``
  p-values; calibrated and ``zscore`` p-values are temperature-invariant and refuse T != 1).
  Mixing weights are the model's own softmax probabilities over all N experts (OLMoE's convention,
  ``norm_topk_prob=False``) at ``weights_temperature`` (default 1: the model's own weights; it
  never changes the selection); ``renormalize=True`` rescales them to sum to 1 over the chosen
  experts, ``renormalize=None`` defers to the model family's convention (the patcher passes it in).
* Ordering: real slots are in order of preference (decreasing probability; for ``bh``/``by``
  increasing p-value with ties broken by the larger logit).
* ``bh``/``by`` floor: when the test selects fewer than ``min_k`` experts, the remaining slots go
  to the not-selected experts with the largest router logits. P-values above the largest critical
  value carry no evidence, so they are not ranked among themselves (the strategy reports them as 1;
  ``bh_select`` on raw p-values fills by p-value instead).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from . import pvalues as pv

PAD_INDEX = 0
ADAPTIVE_DEFAULTS = {"min_k": 1, "max_k": 8}  # every strategy but the top-k family
STEPUP_DEFAULTS = {"alpha": 0.05, "pvalues": "empirical"}  # bh / by


@dataclass(frozen=True)
class Routing:
    weights: torch.Tensor  # [T, K] float32, 0 at padded slots
    indices: torch.Tensor  # [T, K] long, PAD_INDEX at padded slots
    counts: torch.Tensor  # [T] long, number of real slots per token

    @property
    def mask(self) -> torch.Tensor:  # [T, K] bool, True at real slots
        slots = torch.arange(self.indices.shape[1], device=self.indices.device)
        return slots[None, :] < self.counts[:, None]

    @property
    def max_k(self) -> int:
        return self.indices.shape[1]

    def to(self, device) -> "Routing":
        return Routing(self.weights.to(device), self.indices.to(device), self.counts.to(device))


# --------------------------------------------------------------------------- validation


def check_logits(router_logits: torch.Tensor,
                 defer_finite_check: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Validate ``[T, N]`` logits and return them as float32 (float64 stays float64).
    ``defer_finite_check``: called with the logits instead of checking their values here (a host
    read: a GPU sync), for a caller that checks many layers at once (`non_finite_error`)."""
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        shape = tuple(router_logits.shape) if isinstance(router_logits, torch.Tensor) else type(router_logits)
        raise ValueError(f"router logits must be a [tokens, experts] tensor, got {shape}; "
                         "flatten batch and sequence first: logits.reshape(-1, num_experts)")
    if not router_logits.is_floating_point():
        raise TypeError(f"router logits must be floating point, got {router_logits.dtype}")
    logits = router_logits if router_logits.dtype == torch.float64 else router_logits.float()
    # The value check needs the values on the host: skipped while torch.compile traces (no graph break).
    if logits.numel() and not torch.compiler.is_compiling():
        if defer_finite_check is not None:
            defer_finite_check(logits)
        elif not bool(torch.isfinite(logits.abs().amax())):
            raise non_finite_error(int(count_non_finite(logits)))
    return logits


def count_non_finite(logits: torch.Tensor) -> torch.Tensor:
    """NaN/inf values in ``logits``: a 0-d long tensor on their device (no host read)."""
    return (~torch.isfinite(logits)).sum()


def non_finite_error(bad: int, layer: int | None = None) -> ValueError:
    where = "" if layer is None else f" of MoE layer {layer}"
    return ValueError(f"router logits{where} contain {bad} NaN/inf values: the model's forward pass is "
                      "numerically broken upstream of routing (try float32 or bfloat16 instead of float16)")


def _check_k_range(min_k: int, max_k: int) -> None:
    if min_k < 0:
        raise ValueError(f"min_k must be >= 0, got {min_k}")
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    if min_k > max_k:
        raise ValueError(f"min_k ({min_k}) must not exceed max_k ({max_k})")


def _check_max_k_fits(max_k: int, num_experts: int) -> None:
    if max_k > num_experts:
        raise ValueError(f"max_k ({max_k}) exceeds the number of experts ({num_experts}); "
                         f"use max_k <= {num_experts}")


def as_real(value: Any, name: str) -> float:
    """A config number as float: Python, numpy or one-element torch numbers; never bool, str or None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def as_count(value: Any, name: str) -> int:
    """A config count as int; whole floats (8.0, as JSON tools may write 8) are accepted."""
    number = as_real(value, name)
    if not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def check_alpha(alpha: Any) -> float:
    """``alpha`` as float, or ValueError unless it is a number in (0, 1]."""
    value = as_real(alpha, "alpha")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    return value


def check_temperature(temperature: Any, name: str = "temperature") -> float:
    value = as_real(temperature, name)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}")
    return value


# --------------------------------------------------------------------------- ordering


def ordering_key(pvalues: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Exact lexicographic int64 key [T, N] for float32 p-values: high 32 bits = bits of p
    (>= 0, so monotone), low 32 bits = descending tiebreak (the logit) or the column index."""
    high = (pvalues + 0.0).view(torch.int32).long() << 32  # + 0.0 turns -0.0 into +0.0
    if tiebreak is None:
        return high | torch.arange(pvalues.shape[1], device=pvalues.device)
    return high | ((2**32 - 1) - pv.monotone_key(tiebreak))  # larger logit -> smaller key


def smallest_k_order(pvalues: torch.Tensor, k: int, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [T, k] of the k smallest p-values per row, ascending; ties go to the larger
    ``tiebreak`` value (the logit), then to the lower column index — never to sort instability."""
    if pvalues.dtype == torch.float32:
        return torch.topk(ordering_key(pvalues, tiebreak), k, dim=1, largest=False, sorted=True).indices
    # float64: two stable sorts (logit first, then p) give the same lexicographic order.
    num_experts = pvalues.shape[1]
    perm = torch.arange(num_experts, device=pvalues.device).expand(pvalues.shape[0], -1)
    if tiebreak is not None:
        perm = torch.sort(tiebreak, dim=1, descending=True, stable=True).indices
    by_p = torch.sort(pvalues.gather(1, perm), dim=1, stable=True).indices
    return perm.gather(1, by_p)[:, :k]


def _pack(order: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None) -> Routing:
    """Mask slots >= counts: weight 0 and PAD_INDEX. ``order``/``weights`` are [T, K]."""
    slots = torch.arange(order.shape[1], device=order.device)
    real = slots[None, :] < counts[:, None]
    if weights is None:
        weights = torch.ones(order.shape, dtype=torch.float32, device=order.device)
    return Routing(weights=torch.where(real, weights, torch.zeros((), dtype=weights.dtype, device=order.device)),
                   indices=torch.where(real, order, torch.full((), PAD_INDEX, device=order.device)),
                   counts=counts)


# --------------------------------------------------------------------------- the step-up kernel


def stepup_critical_values(num_experts: int, alpha: float, procedure: str) -> torch.Tensor:
    """Critical values c_k, k = 1..N, in float64, computed as statsmodels' ``multipletests`` does:
    BH: (k/N)·alpha; BY: (k/N)/(sum_i 1/i)·alpha (valid under any dependence)."""
    check_alpha(alpha)
    ecdf = torch.arange(1, num_experts + 1, dtype=torch.float64) / num_experts
    if procedure == "bh":
        return ecdf * alpha
    if procedure == "by":
        harmonic = torch.sum(1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64))
        return ecdf / harmonic * alpha
    raise ValueError(f"procedure must be 'bh' or 'by', got {procedure!r}")


def clamped_stepup(pvalues: torch.Tensor, critical: torch.Tensor, min_k: int, max_k: int,
                   tiebreak: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [T, max_k], counts [T]) of the step-up procedure, counts clamped to [min_k, max_k].

    k* = max{k : p_(k) <= c_k} only involves p-values <= c_N, so the j smallest p-values decide
    it, j = max(max_k, most such p-values in any row) — one top-j, no full sort.
    """
    c_lo = _critical_rounded_down(critical, pvalues.dtype, pvalues.device)
    width = max(max_k, int((pvalues <= c_lo[-1]).sum(dim=1).max())) if pvalues.numel() else max_k
    order = smallest_k_order(pvalues, width, tiebreak)  # [T, j] ascending
    ks = torch.arange(1, width + 1, device=pvalues.device)
    below = pvalues.gather(1, order) <= c_lo[:width]
    rejections = torch.where(below, ks, 0).amax(dim=1)
    return order[:, :max_k], rejections.clamp(min_k, max_k)


def _critical_rounded_down(critical: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """c_k rounded down to ``dtype`` so that  p <= c_lo  <=>  p <= c_k  for p of that dtype."""
    c_lo = critical.to(dtype)
    too_high = c_lo.double() > critical
    return torch.where(too_high, torch.nextafter(c_lo, torch.zeros_like(c_lo)), c_lo).to(device)


def tail_stepup(tokens: torch.Tensor, experts: torch.Tensor, tail_p: torch.Tensor, logits: torch.Tensor,
                critical_lo: torch.Tensor, min_k: int, max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [T, max_k], counts [T]) of the step-up procedure from the p-values <= c_N alone.

    ``critical_lo`` [N]: the critical values rounded down to float32 (``_critical_rounded_down``),
    on the logits' device. ``tokens, experts, tail_p`` [E] (row-major) are the entries with
    p <= c_N (``PValueModel.tail``),
    a few per token; every other p-value is treated as 1. Order: those entries by p, ties to the
    larger logit, then the lower expert index; then the remaining experts by logit (the ``min_k``
    floor). Counts: k* clamped to [min_k, max_k]. Same result as ``clamped_stepup`` on the dense
    p-values with the others set to 1, without building or sorting a [T, N] key.
    """
    num_tokens, device = logits.shape[0], logits.device
    per_token = torch.bincount(tokens, minlength=num_tokens)  # [T] tail entries per token
    width = int(per_token.max()) if tokens.numel() else 0
    order = torch.full((num_tokens, max_k), PAD_INDEX, device=device)  # [T, max_k]
    rejections = torch.zeros(num_tokens, dtype=torch.long, device=device)
    if width:
        first = per_token.cumsum(0) - per_token  # [T] position of each token's first entry
        column = torch.arange(tokens.numel(), device=device) - first[tokens]  # [E] rank within its row
        key = torch.full((num_tokens, width), torch.iinfo(torch.int64).max, device=device)  # [T, W]
        key[tokens, column] = ordering_key(tail_p[:, None], logits[tokens, experts][:, None])[:, 0]
        by_key = key.sort(dim=1, stable=True)  # stable: equal keys stay in expert order
        expert_of = torch.zeros((num_tokens, width), dtype=torch.long, device=device)
        expert_of[tokens, column] = experts
        order[:, :width] = expert_of.gather(1, by_key.indices[:, :max_k])
        # p <= c_k  <=>  key <= (bits of c_k rounded down, any tiebreak); padding keys never are
        bound = (critical_lo[:width].view(torch.int32).long() << 32) | (2**32 - 1)
        ks = torch.arange(1, width + 1, device=device)
        rejections = torch.where(by_key.values <= bound, ks, 0).amax(dim=1)
    short = (per_token < min_k).nonzero().squeeze(1)  # tokens the floor fills beyond their tail entries
    if short.numel():
        not_tail = logits[short].float().clone()
        in_short = torch.full((num_tokens,), -1, device=device)
        in_short[short] = torch.arange(short.numel(), device=device)
        hit = in_short[tokens] >= 0
        not_tail[in_short[tokens[hit]], experts[hit]] = -math.inf
        # equal logits go to the lower expert index (argmax: documented first maximum; stable sort)
        if min_k == 1:
            fill = not_tail.argmax(dim=1, keepdim=True)  # [S, 1]
        else:
            fill = torch.sort(not_tail, dim=1, descending=True, stable=True).indices[:, :min_k]  # [S, min_k]
        slot = torch.arange(max_k, device=device)[None, :] - per_token[short][:, None]  # [S, max_k]
        use_fill = (slot >= 0) & (slot < min_k)
        order[short] = torch.where(use_fill, fill.gather(1, slot.clamp(0, min_k - 1)), order[short])
    return order, rejections.clamp(min_k, max_k)


def bh_select(pvalues: torch.Tensor, alpha: float, procedure: str = "bh", min_k: int = 0,
              max_k: int | None = None, tiebreak: torch.Tensor | None = None) -> Routing:
    """Benjamini–Hochberg (or Benjamini–Yekutieli) step-up on p-values ``[T, N]``.

    Returns a Routing whose ``counts`` are the number of rejections clamped to [min_k, max_k]
    (max_k defaults to N) and whose indices are in order of increasing p-value (ties: larger
    ``tiebreak`` value first, then lower index). Below ``min_k`` the next-smallest p-values fill up;
    above ``max_k`` the smallest ``max_k`` are kept. Weights are 1 at real slots.
    """
    if pvalues.dim() != 2 or not pvalues.is_floating_point():
        raise ValueError(f"p-values must be a floating [tokens, experts] tensor, got {tuple(pvalues.shape)} {pvalues.dtype}")
    num_experts = pvalues.shape[1]
    max_k = num_experts if max_k is None else max_k
    _check_k_range(min_k, max_k)
    _check_max_k_fits(max_k, num_experts)
    p = pvalues if pvalues.dtype == torch.float64 else pvalues.float()
    if p.numel() and not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError("p-values must lie in [0, 1] (and not be NaN)")
    critical = stepup_critical_values(num_experts, alpha, procedure)
    order, counts = clamped_stepup(p, critical, min_k, max_k, tiebreak)
    return _pack(order, counts, None)


# --------------------------------------------------------------------------- strategies


@dataclass
class Router:
    """A configured strategy: ``router(logits [T, N], layer=None) -> Routing``.

    ``select`` returns (order [T, K], counts [T] before clamping); the router clamps counts to
    [min_k, max_k], packs, and attaches the mixing weights.
    """
    strategy: str
    select: Callable[[torch.Tensor, int | None], tuple[torch.Tensor, torch.Tensor]]
    min_k: int
    max_k: int
    renormalize: bool | None = None
    uniform: bool = False
    config: Mapping | None = None
    weights_temperature: float = 1.0

    def __call__(self, router_logits: torch.Tensor, layer: int | None = None,
                 model_renormalizes: bool = False,
                 defer_finite_check: Callable[[torch.Tensor], None] | None = None) -> Routing:
        logits = check_logits(router_logits, defer_finite_check)
        _check_max_k_fits(self.max_k, logits.shape[1])
        order, counts = self.select(logits, layer)
        counts = counts.clamp(self.min_k, self.max_k)
        if self.uniform:
            weights = (1.0 / counts.clamp(min=1).float())[:, None].expand(order.shape)
            return _pack(order, counts, weights.contiguous())
        probs = _probabilities(logits, self.weights_temperature)  # [T, N] the model's own weights at T_w
        routing = _pack(order, counts, probs.gather(1, order))
        renormalize = model_renormalizes if self.renormalize is None else self.renormalize
        if renormalize:
            total = routing.weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
            routing = Routing(routing.weights / total, routing.indices, routing.counts)
        return routing


def _probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1, dtype=torch.float32)


def _top_order(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[T, k] experts by decreasing probability, exactly as HF's softmax + topk orders them."""
    return torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1).indices


def _topk(params):
    k = as_count(params.pop("k", 8), "k")
    for bound in ("min_k", "max_k"):
        if params.get(bound, k) != k:
            raise ValueError(f"top-k strategies use exactly k experts; got k={k} and {bound}={params[bound]} "
                             f"(drop {bound})")
    params["min_k"] = params["max_k"] = k

    def select(logits, layer):
        return _top_order(logits, k), torch.full((logits.shape[0],), k, device=logits.device)
    return select


def _prefix_strategy(name: str, knob: str, interval: str, valid: Callable[[float], bool],
                     count: Callable[[torch.Tensor, float, int], torch.Tensor]):
    """A strategy that keeps the ``count(probs [T, N], knob, max_k)`` most probable experts."""
    def make(params):
        if knob not in params:
            raise ValueError(f"strategy {name!r} needs {knob!r} (in {interval}), e.g. "
                             f"{{'strategy': {name!r}, {knob!r}: {_KNOB_EXAMPLES[knob]}}}")
        value, t = as_real(params.pop(knob), f"{name} {knob}"), check_temperature(params.pop("temperature", 1.0))
        if not valid(value):
            raise ValueError(f"{name} {knob} must be in {interval}, got {value}")
        max_k = params["max_k"]

        def select(logits, layer):
            return _top_order(logits, max_k), count(_probabilities(logits, t), value, max_k)
        return select
    return make


_KNOB_EXAMPLES = {"tau": 0.05, "p": 0.3, "beta": 0.5}  # shown in the missing-knob error


def _above_threshold(probs, tau, max_k):
    return (probs > tau).sum(dim=1)


def _smallest_prefix_with_mass(probs, mass, max_k):
    top = torch.topk(probs, max_k, dim=-1).values  # [T, K] descending
    # Crossing expert included; beyond K the clamp decides anyway.
    return (top.cumsum(dim=1) < mass).sum(dim=1) + 1


def _within_ratio_of_max(probs, beta, max_k):
    return (probs >= beta * probs.amax(dim=1, keepdim=True)).sum(dim=1)


def entropy_buckets(router_logits: torch.Tensor, ks: list[int], temperature: float = 1.0) -> list[float]:
    """Calibrate the ``entropy`` strategy: edges (normalised entropy) at the quantiles of the
    observed entropies, so each k in ``ks`` (ascending) is used by an equal share of tokens."""
    entropy = normalised_entropy(check_logits(router_logits), temperature)
    quantiles = torch.arange(1, len(ks), dtype=torch.float64) / len(ks)
    return torch.quantile(entropy.double().cpu(), quantiles).tolist()


def normalised_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[T] routing entropy divided by log N, in [0, 1]."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(dim=1) / math.log(logits.shape[1])


def _entropy(params):
    t = params.pop("temperature", 1.0)
    check_temperature(t)
    min_k, max_k = params["min_k"], params["max_k"]
    ks = params.pop("ks", None) or list(range(max(min_k, 1), max_k + 1))
    edges = params.pop("edges", None)
    if edges is None:  # uncalibrated default: equal-width buckets of normalised entropy
        edges = [i / len(ks) for i in range(1, len(ks))]
    if len(edges) != len(ks) - 1 or list(edges) != sorted(edges):
        raise ValueError(f"entropy needs ascending edges with len(edges) == len(ks) - 1; "
                         f"got {len(edges)} edges for {len(ks)} ks (see entropy_buckets())")

    def select(logits, layer):
        bucket = torch.bucketize(normalised_entropy(logits, t), torch.tensor(edges, device=logits.device))
        counts = torch.tensor(ks, device=logits.device)[bucket]
        return _top_order(logits, max_k), counts
    return select


def _stepup(procedure):
    def make(params, calibration=None):
        alpha = check_alpha(params.pop("alpha", STEPUP_DEFAULTS["alpha"]))
        model = params.pop("pvalues", STEPUP_DEFAULTS["pvalues"])
        t = params.pop("temperature", 1.0)
        pvalue_model = pv.build_pvalue_model(model, temperature=t, calibration=calibration, alpha=alpha,
                                             procedure=procedure)
        min_k, max_k = params["min_k"], params["max_k"]
        tables: dict[tuple[int, torch.device], torch.Tensor] = {}

        def select(logits, layer):
            key = (logits.shape[1], logits.device)
            if key not in tables:
                critical = stepup_critical_values(logits.shape[1], alpha, procedure)
                critical_lo = _critical_rounded_down(critical, torch.float32, logits.device)  # [N]
                tables[key] = critical_lo, float(critical_lo[-1])
            critical_lo, cutoff = tables[key]
            tokens, experts, p = pvalue_model.tail(logits, layer, cutoff)  # [E] entries with p <= cutoff
            return tail_stepup(tokens, experts, p, logits, critical_lo, min_k, max_k)
        return select
    return make


STRATEGIES: dict[str, Callable] = {
    "topk": _topk,
    "topk_renorm": _topk,
    "topk_uniform": _topk,
    "threshold": _prefix_strategy("threshold", "tau", "[0, 1)", lambda v: 0.0 <= v < 1.0, _above_threshold),
    "top_p": _prefix_strategy("top_p", "p", "(0, 1]", lambda v: 0.0 < v <= 1.0, _smallest_prefix_with_mass),
    "ratio": _prefix_strategy("ratio", "beta", "(0, 1]", lambda v: 0.0 < v <= 1.0, _within_ratio_of_max),
    "entropy": _entropy,
    "bh": _stepup("bh"),
    "by": _stepup("by"),
}
_NEEDS_CALIBRATION = {"bh", "by"}


def build_router(config: Mapping | Router, calibration: "pv.Calibration | None" = None) -> Router:
    """Build a Router from a config such as
    ``{"strategy": "bh", "alpha": 0.05, "pvalues": "empirical", "max_k": 8}``.

    Common keys: ``min_k`` (default 1), ``max_k`` (default 8), ``renormalize`` (default: the
    model's convention). Per strategy: topk* ``k``; threshold ``tau``; top_p ``p``; ratio ``beta``;
    entropy ``ks``/``edges``; bh/by ``alpha``, ``pvalues`` (softmax|pooled|empirical|zscore).
    ``temperature`` (default 1) where it changes the selection: top_p, threshold, ratio, entropy and
    bh/by with ``pvalues="softmax"`` (the other p-value models refuse T != 1: they are
    temperature-invariant). ``weights_temperature`` (default 1, every strategy but topk_uniform):
    mixing weights softmax(logits / T_w), the selection unchanged. ``name`` and ``calibrated`` are
    informational.
    """
    if isinstance(config, Router):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"a routing config must be a dict such as {{'strategy': 'bh', 'alpha': 0.05}}, "
                        f"got {config!r} ({type(config).__name__})")
    params = dict(config)
    name = params.pop("strategy", None)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    if name not in ("topk", "topk_renorm", "topk_uniform"):
        params = {**ADAPTIVE_DEFAULTS, **params}
    renormalize = params.pop("renormalize", None)
    weights_temperature = params.pop("weights_temperature", 1.0)
    check_temperature(weights_temperature, "weights_temperature")
    if name == "topk_uniform" and weights_temperature != 1.0:
        raise ValueError("topk_uniform mixes with uniform weights 1/k: weights_temperature does not apply (drop it)")
    if renormalize is not None and not isinstance(renormalize, bool):
        raise ValueError(f"renormalize must be True, False or None (the model's convention), got {renormalize!r}")
    if name == "topk_renorm":
        renormalize = True
    params |= {bound: as_count(params[bound], bound) for bound in ("min_k", "max_k") if bound in params}
    make = STRATEGIES[name]
    select = make(params, calibration) if name in _NEEDS_CALIBRATION else make(params)
    min_k, max_k = params.pop("min_k"), params.pop("max_k")
    _check_k_range(min_k, max_k)
    for informational in ("name", "calibrated"):  # a label; how calibrate_to_mean_k found the knob
        params.pop(informational, None)
    if params:
        raise ValueError(f"strategy {name!r} does not take {sorted(params)}; see build_router's docstring")
    return Router(strategy=name, select=select, min_k=min_k, max_k=max_k, renormalize=renormalize,
                  uniform=(name == "topk_uniform"), config=dict(config), weights_temperature=weights_temperature)


def route(router_logits: torch.Tensor, config: Mapping | Router, layer: int | None = None,
          calibration: "pv.Calibration | None" = None, model_renormalizes: bool = False) -> Routing:
    """Route ``[T, N]`` logits with a config (or a built Router). ``layer`` selects the
    calibration of that layer for calibrated p-value models."""
    return build_router(config, calibration)(router_logits, layer, model_renormalizes)
