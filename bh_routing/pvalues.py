"""P-value models for BH routing, and the calibration data the calibrated ones need.

Why several models (see the user guide): ``softmax`` p-values (1 - prob) are ~0.85 on OLMoE's flat
router and BH selects nothing; a per-layer ``pooled`` null is uniform by construction and BH finds
little. ``empirical`` compares each expert's logit with *that expert's own* logits on calibration
tokens where the native top-k did not route to it — a null of "irrelevant" affinities.

Every model maps float32 logits [T, N] to float32 p-values [T, N] in (0, 1].

What each model's p-value means
-------------------------------
* ``empirical`` (calibrated): p = (1 + #{null >= x}) / (n + 1) against expert e's own null sample
  (its logits on n calibration tokens where the native top-k did not route to it). Valid — P(p <= q)
  <= q for every q — for expert e on a new token *on which e is not routed natively*, **if** that
  token's logit for e and e's calibration null are exchangeable: the new token comes from the same
  distribution as the calibration text (same model, same kind of text; the subsample is random, so
  subsampling keeps exchangeability). This is a per-expert, marginal-over-tokens guarantee; text
  unlike the calibration text breaks it for the experts whose logits shift (measure it with
  :func:`bh_routing.validity.calibration_quality`).
* ``pooled`` (calibrated): the same against one null per layer (all experts' logits on all
  calibration tokens). Valid for a new (token, expert) pair drawn like a random calibration pair;
  conservative for non-routed experts, which sit low in that null.
* ``softmax``: 1 - softmax(logits / T). A heuristic score, the seed's rule. It never falls below
  k/(k+1) for an expert outside the native top-k (whatever T: k experts have larger probabilities),
  so it is conservative for that null; BH on it selects at most one expert for α < N/4 (two
  probabilities cannot both exceed 1 - 2α/N). Computed so that it is never 0 (the top expert's p is
  the sum of the others' probabilities, clamped to the smallest normal float32).
* ``zscore``: the normal upper tail of the logit's robust z-score *within its own token* (median and
  MAD of the token's N logits). A heuristic score under a within-token normal approximation, **not**
  a p-value under a stated null: a token's N logits are not a normal sample and the selected experts
  move the median and MAD. Tails beyond float32 are clamped to the smallest normal float32 (ties
  then go to the larger logit, like every p-value tie).

Temperature: a calibrated p-value is a rank of the logit within a null of logits, so dividing both
by T changes nothing and dividing only the new logits makes the p-values invalid. Calibrated models
and ``zscore`` (scale-invariant) therefore refuse T != 1; T applies to ``softmax`` p-values and,
through the router's ``weights_temperature``, to the mixing weights.

Resolution: the smallest calibrated p-value is 1/(n+1). BH/BY with critical values c_1 <= ... <=
c_N (c_N = α for BH, α/H_N for BY, c_1 = c_N/N) can select nothing when 1/(n+1) > c_N
(:class:`ResolutionError`) and no expert on its own when 1/(n+1) > c_1 (a warning);
:func:`calibration_requirement` says how many null samples and calibration tokens a setting needs.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

PVALUE_MODELS = ("softmax", "pooled", "empirical", "zscore")
CALIBRATED = ("pooled", "empirical")  # valid under exchangeability with the calibration text
HEURISTIC = ("softmax", "zscore")  # scores on the p-value scale, no exact null (see the module docstring)
TEMPERATURE_MODELS = ("softmax",)  # the only p-values T changes; the rest are temperature-invariant
SMALLEST_PVALUE = torch.finfo(torch.float32).tiny  # heuristic tails are clamped here, never 0
FILE_FORMAT = "bh_routing.calibration/1"


# --------------------------------------------------------------------------- calibration


class CalibrationMismatchError(ValueError):
    """A calibration file made on a different model than the one it is used with."""


def model_metadata(model) -> dict:
    """What a calibration records about its model so that ``Calibration.check_model`` can compare."""
    from .models import weights_sample
    return {"weights": weights_sample(model)}


@dataclass
class Calibration:
    """Null logit samples per layer (``pooled``) and per layer and expert (``empirical``).

    Sorted ascending, padded with +inf to a common length; ``*_counts`` holds the real lengths.
    """
    empirical: torch.Tensor  # [L, N, M] float32: expert e's logits on tokens not routed to e
    empirical_counts: torch.Tensor  # [L, N] long
    pooled: torch.Tensor  # [L, M'] float32: all experts' logits on all tokens
    pooled_counts: torch.Tensor  # [L] long
    top_k: int
    metadata: dict = field(default_factory=dict)
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return self.empirical.shape[0]

    @property
    def num_experts(self) -> int:
        return self.empirical.shape[1]

    @classmethod
    def from_router_logits(cls, router_logits: Sequence[torch.Tensor], top_k: int,
                           max_samples_per_expert: int = 8192, max_samples_pooled: int = 65536,
                           seed: int = 0, metadata: dict | None = None) -> "Calibration":
        """Build from one calibration pass: ``router_logits[layer]`` is [T, N] (native routing,
        padding tokens already removed). Larger nulls are subsampled at random (seeded) so the
        stored sample stays exchangeable with new logits and the p-values stay valid."""
        if not router_logits:
            raise ValueError("calibration needs router logits of at least one layer")
        generator = torch.Generator().manual_seed(seed)
        empirical, empirical_counts, pooled, pooled_counts = [], [], [], []
        for layer, logits in enumerate(router_logits):
            logits = logits.detach().float().cpu()  # [T, N]
            if logits.dim() != 2 or not bool(torch.isfinite(logits).all()):
                raise ValueError(f"layer {layer}: calibration logits must be finite [tokens, experts]")
            num_tokens, num_experts = logits.shape
            if not 0 < top_k < num_experts:
                raise ValueError(f"top_k must be in 1..{num_experts - 1}, got {top_k}")
            routed = torch.zeros_like(logits, dtype=torch.bool)
            routed.scatter_(1, torch.topk(torch.softmax(logits, -1), top_k, dim=-1).indices, True)
            # Random subsample of each expert's non-routed logits: the M smallest random keys.
            keys = torch.rand(logits.shape, generator=generator).masked_fill(routed, math.inf).T  # [N, T]
            take = min(max_samples_per_expert, num_tokens)
            chosen_keys, chosen = torch.topk(keys, take, dim=1, largest=False)
            values = logits.T.gather(1, chosen).masked_fill(torch.isinf(chosen_keys), math.inf)
            empirical.append(values.sort(dim=1).values)
            empirical_counts.append(torch.isfinite(chosen_keys).sum(dim=1))
            flat = logits.flatten()
            pick = torch.randperm(flat.numel(), generator=generator)[:max_samples_pooled]
            pooled.append(flat[pick].sort().values)
            pooled_counts.append(torch.tensor(pick.numel()))
        width = max(v.shape[1] for v in empirical)
        empirical = [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=math.inf) for v in empirical]
        width = max(v.numel() for v in pooled)
        pooled = [torch.nn.functional.pad(v, (0, width - v.numel()), value=math.inf) for v in pooled]
        meta = {"num_tokens": int(router_logits[0].shape[0]), "seed": seed, **(metadata or {})}
        return cls(torch.stack(empirical), torch.stack(empirical_counts), torch.stack(pooled),
                   torch.stack(pooled_counts), top_k, meta)

    def save(self, path) -> None:
        from safetensors.torch import save_file
        tensors = {"empirical": self.empirical, "empirical_counts": self.empirical_counts,
                   "pooled": self.pooled, "pooled_counts": self.pooled_counts}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"format": FILE_FORMAT, "top_k": str(self.top_k),
                            "metadata": json.dumps(self.metadata, sort_keys=True)})

    @classmethod
    def load(cls, path, model=None) -> "Calibration":
        """Read a file written by ``save``. With ``model``: refuse (CalibrationMismatchError) a
        calibration made on another model — other MoE shape, or other weights (see ``check_model``)."""
        from safetensors import SafetensorError, safe_open
        redo = "recalibrate (`python -m bh_routing calibrate`, or leave --calibration out)"
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != FILE_FORMAT:
                    raise ValueError(f"{path} is not a bh_routing calibration file (format {header.get('format')!r}); "
                                     f"{redo}")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            calibration = cls(tensors["empirical"], tensors["empirical_counts"], tensors["pooled"],
                              tensors["pooled_counts"], int(header["top_k"]), json.loads(header["metadata"]))
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the calibration file {path} ({type(error).__name__}: {error}): "
                             f"the file is missing or damaged; {redo}") from None
        if model is not None:
            calibration.check_model(model, source=str(path))
        return calibration

    def fingerprint(self) -> str:
        """Digest of the null samples and top_k: equal fingerprints, equal p-values."""
        import hashlib
        digest = hashlib.sha256(f"top_k={self.top_k}".encode())
        for tensor in (self.empirical, self.empirical_counts, self.pooled, self.pooled_counts):
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()[:24]

    def check_model(self, model, source: str = "the calibration") -> None:
        """Raise CalibrationMismatchError unless ``model`` has this calibration's MoE shape (blocks,
        experts, native top-k) and, where the metadata holds one, the same weights sample."""
        from .models import same_weights, weights_sample
        from .patching import find_moe_blocks
        blocks = find_moe_blocks(model)
        mine = (self.num_layers, self.num_experts, self.top_k)
        theirs = (len(blocks), blocks[0].num_experts, blocks[0].top_k)
        made_on = self.metadata.get("model") or "an unnamed model"
        model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        if mine != theirs:
            raise CalibrationMismatchError(
                f"{source} was made on {made_on} with {mine[0]} MoE layers x {mine[1]} experts, top-{mine[2]}; "
                f"the model {model_name} has {theirs[0]} x {theirs[1]}, top-{theirs[2]}: recalibrate on this model")
        stored = self.metadata.get("weights")
        if stored is not None and not same_weights(stored, weights_sample(model)):
            raise CalibrationMismatchError(
                f"{source} was made on {made_on}, whose weights differ from those of the model {model_name} "
                "(same shape, other weights): recalibrate on this model")

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(empirical, empirical_counts, pooled, pooled_counts) on ``device``, cached."""
        if device not in self._device_cache:
            self._device_cache[device] = tuple(t.to(device) for t in
                                               (self.empirical, self.empirical_counts, self.pooled, self.pooled_counts))
        return self._device_cache[device]

    def tail_table(self, model: str, layer: int, cutoff: float, device: torch.device) -> "TailTable":
        """What the ``model`` (empirical|pooled) p-values <= ``cutoff`` of layer ``layer`` need
        (see ``TailTable``), cached."""
        key = ("tail", model, layer, cutoff, device)
        if key not in self._device_cache:
            if model == "empirical":
                null, counts = self.empirical[layer], self.empirical_counts[layer]  # [N, M], [N]
            else:  # one null shared by every expert
                null, counts = self.pooled[layer][None, :], self.pooled_counts[layer][None]  # [1, M'], [1]
            self._device_cache[key] = TailTable.build(null, counts, cutoff).to(device)
        return self._device_cache[key]

    def check_layer(self, layer: int | None, num_experts: int) -> int:
        if layer is None:
            raise ValueError("calibrated p-values need the layer index: call router(logits, layer=i)")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside the calibration's {self.num_layers} layers: "
                             "the calibration was made for a different model; recalibrate on this one")
        if num_experts != self.num_experts:
            raise ValueError(f"logits have {num_experts} experts but the calibration has {self.num_experts}: "
                             "recalibrate on this model")
        return layer


@dataclass(frozen=True)
class TailTable:
    """One layer's per-expert nulls (or its one pooled null) cut down to what p-values <= ``cutoff`` need.

    ``p_e(x) <= cutoff  <=>  x > thresholds[e]`` for the float32 p-values of ``upper_tail_pvalues``
    (found by evaluating that very arithmetic for every possible count). Such an ``x`` exceeds the
    ``start[e]`` smallest null values, so only the top ``width`` ones (~cutoff·n, a few hundred) are
    searched: ``keys`` holds them as monotone int64 keys, expert e's offset by e·2**32, so that one flat
    searchsorted answers queries for any mix of experts from a table that stays in cache.
    """
    thresholds: torch.Tensor  # [R] float32 (R = N experts, or 1 pooled), +inf: no p-value <= cutoff
    keys: torch.Tensor  # [R * width] int64 ascending
    start: torch.Tensor  # [R] long: null values below index start[r] are all < any tail x
    counts: torch.Tensor  # [R] long: null size n_r
    width: int

    @classmethod
    def build(cls, null: torch.Tensor, counts: torch.Tensor, cutoff: float) -> "TailTable":
        """``null`` [N, M] ascending (+inf padded), ``counts`` [N]."""
        num_experts, size = null.shape
        at_or_above = torch.arange(size + 1)[None, :]  # candidate #{null >= x}
        p = (at_or_above + 1).float() / (counts[:, None] + 1).float()
        ok = (p <= torch.tensor(cutoff, dtype=torch.float32)) & (at_or_above <= counts[:, None])
        largest = torch.where(ok, at_or_above, -1).amax(dim=1)  # [N] largest allowed count, -1: none
        below = counts - largest - 1  # x must exceed the null value with this many below it
        # (largest = -1: no p-value <= cutoff, below = counts may be = size; clamped in the gather,
        # whose result torch.where then discards)
        thresholds = torch.where(largest < 0, torch.full_like(null[:, 0], math.inf),
                                 null.gather(1, below.clamp(0, size - 1)[:, None]).squeeze(1))
        thresholds = torch.where(below < 0, torch.full_like(thresholds, -math.inf), thresholds)
        start = torch.where(largest < 0, counts, below.clamp(min=0))  # [N]
        width = max(int((counts - start).max()), 1)
        columns = (start[:, None] + torch.arange(width)[None, :]).clamp(max=size - 1)  # [N, width]
        top = torch.where(columns < counts[:, None], null.gather(1, columns), math.inf)
        rows = torch.arange(num_experts)[:, None] << 32
        return cls(thresholds, (rows + monotone_key(top)).reshape(-1), start, counts, width)

    def to(self, device) -> "TailTable":
        return TailTable(self.thresholds.to(device), self.keys.to(device), self.start.to(device),
                         self.counts.to(device), self.width)

    def pvalues(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entries of ``x`` [T, N] float32 with p <= cutoff: (tokens [E], experts [E], p [E]), row-major."""
        tokens, experts = (x > self.thresholds).nonzero(as_tuple=True)
        row = experts if self.counts.numel() > 1 else torch.zeros_like(experts)  # [E] row of the table
        query = (row << 32) + monotone_key(x[tokens, experts])
        found = torch.searchsorted(self.keys, query, side="left") - row * self.width
        n = self.counts[row]
        below = self.start[row] + found  # #{null < x}
        return tokens, experts, (n - below + 1).float() / (n + 1).float()


# --------------------------------------------------------------------------- p-value models


def upper_tail_pvalues(null_sorted: torch.Tensor, null_counts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Exact empirical upper-tail p-values (1 + #{null >= x}) / (n + 1).

    ``null_sorted`` [R, M] ascending (+inf padding beyond ``null_counts`` [R]); ``x`` [R, Q].
    """
    below = torch.searchsorted(null_sorted, x.contiguous(), side="left")  # #{null < x}
    at_or_above = null_counts[:, None] - below
    return (at_or_above + 1).float() / (null_counts[:, None] + 1).float()


def monotone_key(x: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2**32) ordered as the float32 values of ``x`` (+inf included)."""
    bits = x.float().view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits) + 2**31


@dataclass(frozen=True)
class PValueModel:
    """``model(logits [T, N], layer) -> p-values [T, N]`` float32 in (0, 1].

    ``model.tail(logits, layer, cutoff)`` returns only the entries with p <= cutoff, row-major, as
    (tokens [E], experts [E], p [E]): all a step-up procedure whose largest critical value is
    ``cutoff`` looks at. ``empirical`` computes just those (a few per token) instead of all T*N."""
    dense: Callable[[torch.Tensor, int | None], torch.Tensor]
    sparse_tail: Callable[[torch.Tensor, int | None, float], tuple] | None = None

    def __call__(self, logits: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return self.dense(logits, layer)

    def tail(self, logits: torch.Tensor, layer: int | None, cutoff: float):
        if self.sparse_tail is not None:
            return self.sparse_tail(logits, layer, cutoff)
        p = self.dense(logits, layer)
        tokens, experts = (p <= cutoff).nonzero(as_tuple=True)
        return tokens, experts, p[tokens, experts]


def _softmax_pvalues(temperature):
    def pvalues(logits, layer):
        probs = torch.softmax(logits / temperature, dim=-1, dtype=torch.float32)  # [T, N]
        p = 1.0 - probs
        # The top expert's 1 - prob cancels to 0 when prob rounds to 1: use the others' sum instead.
        top = probs.argmax(dim=1, keepdim=True)  # [T, 1]
        p.scatter_(1, top, probs.scatter(1, top, 0.0).sum(dim=1, keepdim=True))
        return p.clamp(min=SMALLEST_PVALUE)
    return PValueModel(pvalues)


def _zscore_pvalues():
    def pvalues(logits, layer):
        x = logits.double()
        med = _median(logits)  # sorted in the logits' own dtype: the same order, so the same float64 median
        mad = _median((x - med).abs())
        scale = (1.4826 * mad).clamp(min=torch.finfo(torch.float64).tiny)
        z = (x - med) / scale
        # float64 tail (0 only beyond z ~ 38), then clamped: float32 alone underflows from z ~ 13
        return (0.5 * torch.erfc(z / math.sqrt(2.0))).float().clamp(min=SMALLEST_PVALUE)
    return PValueModel(pvalues)


def _median(x: torch.Tensor) -> torch.Tensor:
    """Row medians [T, 1] in float64, averaging the two middle values for even N (as numpy does).
    The middle values are the smallest of the upper half, found by a partial top-k (no full sort:
    1.6x faster on a CPU for N = 64), so the result is the same element for element."""
    n = x.shape[1]
    upper_half = x.topk(n - (n - 1) // 2, dim=1, sorted=False).values  # [T, n - (n-1)//2]
    middle = upper_half.topk(min(2, upper_half.shape[1]), dim=1, largest=False).values.double()  # ascending
    return ((middle[:, 0] + middle[:, -1 if n % 2 == 0 else 0]) / 2)[:, None]


def _pooled_pvalues(calibration):
    def pvalues(logits, layer):
        calibration.check_layer(layer, logits.shape[1])
        _, _, pooled, pooled_counts = calibration.on(logits.device)
        x = logits.float().reshape(1, -1)  # [1, T*N]
        return upper_tail_pvalues(pooled[layer:layer + 1], pooled_counts[layer:layer + 1], x).view_as(logits)
    return PValueModel(pvalues, _calibrated_tail("pooled", calibration))


def _empirical_pvalues(calibration):
    def pvalues(logits, layer):
        calibration.check_layer(layer, logits.shape[1])
        empirical, counts, _, _ = calibration.on(logits.device)
        return upper_tail_pvalues(empirical[layer], counts[layer], logits.float().T).T  # [T, N]
    return PValueModel(pvalues, _calibrated_tail("empirical", calibration))


def _calibrated_tail(model, calibration):
    def tail(logits, layer, cutoff):
        calibration.check_layer(layer, logits.shape[1])
        x = logits.float()  # [T, N]
        return calibration.tail_table(model, layer, cutoff, x.device).pvalues(x)
    return tail


# --------------------------------------------------------------------------- resolution


class ResolutionError(ValueError):
    """The calibration's null is too small for α: the smallest p-value 1/(n+1) exceeds the largest
    critical value, so the step-up procedure can never select an expert."""


def null_samples_needed(critical: float) -> int:
    """Smallest null size n whose best float32 p-value 1/(n+1) is <= ``critical`` (as the step-up
    compares them: the critical value rounded down to float32)."""
    bound = torch.tensor(critical, dtype=torch.float64).float()
    if float(bound) > critical:
        bound = torch.nextafter(bound, torch.zeros(()))
    n = max(math.ceil(1.0 / critical) - 1, 1)
    while float(torch.tensor(1.0) / torch.tensor(float(n + 1))) > float(bound):
        n += 1
    return n


@dataclass(frozen=True)
class CalibrationRequirement:
    """What a BH/BY setting needs from a calibration (``calibration_requirement``)."""
    alpha: float
    procedure: str
    model: str
    critical_first: float  # c_1: the smallest critical value (select one expert on its own)
    critical_last: float  # c_N: the largest (select anything at all)
    null_samples: int  # per expert (empirical) or per layer (pooled) for p <= c_1
    tokens: int  # calibration tokens that give that many null samples (on average, for empirical)
    null_samples_any: int  # for p <= c_N
    tokens_any: int

    def describe(self) -> str:
        per = "per expert" if self.model == "empirical" else "per layer"
        return (f"{self.procedure.upper()} at alpha={self.alpha:g} has critical values c_1 = {self.critical_first:.3g} "
                f"... c_N = {self.critical_last:.3g}: selecting one expert on its own needs p <= c_1, i.e. >= "
                f"{self.null_samples:,} {self.model} null samples {per} (~{self.tokens:,} calibration tokens); "
                f"selecting anything needs >= {self.null_samples_any:,} (~{self.tokens_any:,} tokens)")


def calibration_requirement(alpha: float, procedure: str, num_experts: int, top_k: int,
                            model: str = "empirical") -> CalibrationRequirement:
    """Null samples and calibration tokens BH/BY at ``alpha`` needs with ``model`` p-values.

    ``empirical``: expert e's null holds its logits on tokens where the native top-k skips it, a share
    1 - k/N of tokens on average (busier experts need more tokens; ``max_samples_per_expert`` of
    :meth:`Calibration.from_router_logits` must be at least the null size). ``pooled``: every token
    adds N values (``max_samples_pooled`` must be at least the null size)."""
    from .selection import stepup_critical_values
    if model not in CALIBRATED:
        raise ValueError(f"only calibrated p-value models {CALIBRATED} need a calibration, not {model!r}")
    critical = stepup_critical_values(num_experts, alpha, procedure)
    per_token = (1.0 - top_k / num_experts) if model == "empirical" else float(num_experts)
    first, last = float(critical[0]), float(critical[-1])
    n_first, n_last = null_samples_needed(first), null_samples_needed(last)
    return CalibrationRequirement(alpha, procedure, model, first, last, n_first, math.ceil(n_first / per_token),
                                  n_last, math.ceil(n_last / per_token))


def _check_resolution(calibration: Calibration, model: str, alpha: float, procedure: str) -> None:
    """The smallest attainable p-value is 1/(n+1): error when it exceeds c_N, warn when it exceeds c_1."""
    counts = calibration.empirical_counts if model == "empirical" else calibration.pooled_counts
    n = int(counts.max())
    best = float(torch.tensor(1.0) / torch.tensor(float(n + 1)))  # as upper_tail_pvalues computes it
    need = calibration_requirement(alpha, procedure, calibration.num_experts, calibration.top_k, model)
    have = f"p-value resolution: the calibration's {model} null has at most {n:,} samples, so its smallest p-value is {best:.3g}"
    cap = "max_samples_per_expert" if model == "empirical" else "max_samples_pooled"

    def how(samples, tokens):
        return (f"calibrate on >= {tokens:,} tokens with {cap} >= {samples:,} (Calibration.from_router_logits; "
                f"experiments.calibrate(size_for=configs) sets both)")
    if n < need.null_samples_any:
        raise ResolutionError(
            f"{have} > {procedure.upper()}'s largest critical value c_N = {need.critical_last:.3g} at alpha={alpha}: "
            f"it can never select an expert (every token sits on the min_k floor). It needs >= "
            f"{need.null_samples_any:,} null samples: {how(need.null_samples_any, need.tokens_any)}, or raise alpha.")
    if n < need.null_samples:
        warnings.warn(
            f"{have} > {procedure.upper()}'s smallest critical value c_1 = {need.critical_first:.3g} at alpha={alpha}: "
            f"it cannot select a single expert on its own. For that it needs >= {need.null_samples:,} null samples: "
            f"{how(need.null_samples, need.tokens)}.", stacklevel=4)


def build_pvalue_model(name: str, temperature: float = 1.0, calibration: Calibration | None = None,
                       alpha: float | None = None, procedure: str = "bh") -> PValueModel:
    """The p-value model ``name``: ``model(logits [T, N] float32, layer) -> p-values [T, N] float32``
    (see ``PValueModel`` for its sparse ``tail``). With ``alpha`` (and ``procedure``), a calibrated
    model checks that its null can resolve the step-up's critical values (``_check_resolution``)."""
    from .selection import check_temperature
    check_temperature(temperature)
    if name not in PVALUE_MODELS:
        raise ValueError(f"unknown p-value model {name!r}; choose one of {PVALUE_MODELS}")
    if temperature != 1.0 and name not in TEMPERATURE_MODELS:
        why = ("a calibrated p-value is the rank of the logit in a null of logits: dividing both by T changes "
               "nothing, dividing only the new logits makes the p-values invalid" if name in CALIBRATED
               else "the z-score is scale-invariant")
        raise ValueError(f"temperature={temperature} with pvalues={name!r}: selection is temperature-invariant "
                         f"({why}). Use alpha to change how many experts are selected, weights_temperature to "
                         f"sharpen or flatten the mixing weights, or pvalues='softmax', whose p-values T changes.")
    if name == "softmax":
        return _softmax_pvalues(temperature)
    if name == "zscore":
        return _zscore_pvalues()
    if calibration is None:
        raise ValueError(f"p-value model {name!r} needs a calibration: build one with "
                         "Calibration.from_router_logits(...) (or `python -m bh_routing calibrate`) and pass "
                         "calibration=..., or use pvalues='zscore' / 'softmax', which need none")
    if alpha is not None:
        _check_resolution(calibration, name, alpha, procedure)
    return (_pooled_pvalues if name == "pooled" else _empirical_pvalues)(calibration)


def compute_pvalues(router_logits: torch.Tensor, model: str = "empirical", layer: int | None = None,
                    calibration: Calibration | None = None, temperature: float = 1.0) -> torch.Tensor:
    """P-values [T, N] (float32) of ``router_logits`` [T, N] under a p-value model."""
    from .selection import check_logits
    return build_pvalue_model(model, temperature, calibration)(check_logits(router_logits), layer)
