"""How a MoE family's router turns its logits into a choice and into mixing weights — the one place
for these conventions. Four are known; together they cover every transformers MoE router of the
``(logits, top-k weights, top-k indices)`` interface in use today, and Llama-4's:

* ``softmax``: rank ``softmax(logits)``; weights are those probabilities, renormalised over the
  chosen experts when the router says so (OLMoE, FlexOlmo and Qwen2/3-MoE through
  ``norm_topk_prob``, Mixtral always).
* ``softmax_topk``: rank the logits; weights are a softmax over the *chosen* experts' logits
  (GPT-OSS, Granite-MoE). The same numbers as renormalised probabilities, rounded differently.
* ``sigmoid_grouped``: DeepSeek-V3 (and GLM-4-MoE, which transformers implements the same way):
  scores ``sigmoid(logits)``; the router *ranks* ``scores + e_score_correction_bias`` restricted to
  the token's ``topk_group`` best expert groups (a group's strength: the sum of its two best
  biased scores); the weights are the unbiased scores of the chosen experts, renormalised if
  ``norm_topk_prob``, times ``routed_scaling_factor``.
* ``sigmoid``: Llama-4: rank the logits; the weight of a chosen expert is ``sigmoid(its logit)``,
  not renormalised (the Llama-4 layout multiplies it into the expert's input, not its output).

A strategy sees each family's **selection logits** (what the native router ranks; the "logits"
a strategy, its p-values and their calibration read) and mixes with the family's own weight
convention. Which convention a router follows is not looked up by class name: :func:`identify`
reproduces the router's own output on probe rows with each convention and keeps the one that matches
bit for bit, so a new family with a known convention works without code and one without is refused.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def _gather_real(values: torch.Tensor, routing) -> torch.Tensor:
    """``values [T, E]`` at the routing's slots, 0 at padded slots: ``[T, K]`` float32."""
    return values.float().gather(1, routing.indices) * routing.mask


class Softmax:
    """Rank and weight with softmax probabilities (the Router's own convention)."""
    name = "softmax"
    supports_weights_temperature = True

    def __init__(self, renormalizes: bool):
        self._renormalizes = renormalizes

    def renormalizes(self, gate) -> bool:
        return self._renormalizes

    def selection_logits(self, gate, router_logits: torch.Tensor) -> torch.Tensor:
        return router_logits

    def mix(self, gate, router_logits, routing, router):
        return routing  # the Router's probabilities, renormalised per `renormalizes`

    def native(self, gate, router_logits: torch.Tensor, top_k: int):
        """The router's own (weights [T, k], indices [T, k]) from its logits, op for op."""
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        top, indices = torch.topk(probs, top_k, dim=-1)
        if self._renormalizes:
            top = top / top.sum(dim=-1, keepdim=True)
        return top, indices


class SoftmaxTopK:
    """Rank the logits; weight with a softmax over the chosen experts' logits."""
    name = "softmax_topk"
    supports_weights_temperature = True

    def renormalizes(self, gate) -> bool:
        return True

    def selection_logits(self, gate, router_logits):
        return router_logits

    def mix(self, gate, router_logits, routing, router):
        if router.uniform or router.renormalize is False:  # 1/k, or the plain probabilities
            return routing
        chosen = router_logits.float().gather(1, routing.indices)  # [T, K]
        if router.weights_temperature != 1.0:
            chosen = chosen / router.weights_temperature
        chosen = chosen.masked_fill(~routing.mask, float("-inf"))
        return type(routing)(torch.softmax(chosen, dim=-1), routing.indices, routing.counts)

    def native(self, gate, router_logits, top_k):
        top, indices = torch.topk(router_logits.float(), top_k, dim=-1)
        return torch.softmax(top, dim=-1), indices


class SigmoidGrouped:
    """DeepSeek-V3 style: biased sigmoid scores ranked within the token's best expert groups."""
    name = "sigmoid_grouped"
    supports_weights_temperature = False  # sigmoid weights have no temperature of their own

    @staticmethod
    def matches(gate) -> bool:
        return all(hasattr(gate, a) for a in ("e_score_correction_bias", "num_group", "topk_group",
                                               "norm_topk_prob", "routed_scaling_factor"))

    def renormalizes(self, gate) -> bool:
        return bool(gate.norm_topk_prob)

    @staticmethod
    def _biased_scores_and_eligible(gate, router_logits):
        scores = router_logits.float().sigmoid() + gate.e_score_correction_bias  # [T, E]
        tokens, experts = scores.shape
        group_scores = scores.view(tokens, gate.num_group, experts // gate.num_group).topk(2, dim=-1)[0].sum(-1)
        best_groups = torch.topk(group_scores, k=gate.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores).scatter_(1, best_groups, 1)  # [T, G]
        eligible = group_mask.bool().repeat_interleave(experts // gate.num_group, dim=1)  # [T, E]
        return scores, eligible

    def selection_logits(self, gate, router_logits):
        """``sigmoid(logits) + bias``; experts outside the token's best groups one unit below its
        lowest eligible score (never chosen before an eligible one; finite, so p-values exist)."""
        scores, eligible = self._biased_scores_and_eligible(gate, router_logits)
        floor = scores.masked_fill(~eligible, float("inf")).amin(dim=1, keepdim=True) - 1.0  # [T, 1]
        return torch.where(eligible, scores, floor)

    def _native_slot_order(self, gate, router_logits, routing):
        """Tokens routed to exactly the router's own choice take its slot order (torch.topk with
        sorted=False), so the weights' normalisation sums in the same order and rounds the same."""
        if routing.max_k != gate.top_k:
            return routing
        native_indices = self.native(gate, router_logits, gate.top_k)[1]  # [T, k]
        same = ((routing.counts == gate.top_k)
                & (routing.indices.sort(dim=-1).values == native_indices.sort(dim=-1).values).all(dim=-1))
        indices = torch.where(same[:, None], native_indices, routing.indices)
        return type(routing)(routing.weights, indices, routing.counts)

    def mix(self, gate, router_logits, routing, router):
        if router.uniform:
            return routing
        routing = self._native_slot_order(gate, router_logits, routing)
        weights = _gather_real(router_logits.float().sigmoid(), routing)  # [T, K] unbiased scores
        renormalize = self.renormalizes(gate) if router.renormalize is None else router.renormalize
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return type(routing)(weights * gate.routed_scaling_factor, routing.indices, routing.counts)

    def native(self, gate, router_logits, top_k):
        scores, eligible = self._biased_scores_and_eligible(gate, router_logits)
        indices = torch.topk(scores.masked_fill(~eligible, float("-inf")), k=top_k, dim=-1, sorted=False)[1]
        weights = router_logits.float().sigmoid().gather(1, indices)
        if gate.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * gate.routed_scaling_factor, indices


class Sigmoid:
    """Llama-4: rank the logits; weight each chosen expert by the sigmoid of its own logit.

    Adaptive strategies keep this convention: whatever experts a strategy chooses, each gets
    ``sigmoid(logit)`` (independent per expert, so adding or dropping an expert never changes the
    others' weights), unless the strategy asks otherwise (``renormalize=True``: divided by their sum;
    ``topk_uniform``: 1/k). At the native k this is the model's own weight, bit for bit."""
    name = "sigmoid"
    supports_weights_temperature = False  # sigmoid weights have no temperature of their own

    def renormalizes(self, gate) -> bool:
        return False

    def selection_logits(self, gate, router_logits):
        return router_logits

    def mix(self, gate, router_logits, routing, router):
        if router.uniform:
            return routing
        weights = _gather_real(router_logits.float().sigmoid(), routing)  # [T, K]
        if router.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return type(routing)(weights, routing.indices, routing.counts)

    def native(self, gate, router_logits, top_k):
        top, indices = torch.topk(router_logits, top_k, dim=1)
        return top.float().sigmoid(), indices


def candidates(gate) -> list:
    """The conventions a router could follow, most specific first."""
    if SigmoidGrouped.matches(gate):
        return [SigmoidGrouped()]
    return [Softmax(False), Softmax(True), SoftmaxTopK(), Sigmoid()]


def same_choice(weights, indices, ref_weights, ref_indices) -> bool:
    """Same experts with bit-identical weights per token, in any slot order."""
    if indices.shape != ref_indices.shape:
        return False
    order, ref_order = indices.argsort(dim=-1), ref_indices.argsort(dim=-1)
    return (torch.equal(indices.gather(1, order), ref_indices.gather(1, ref_order))
            and torch.equal(weights.gather(1, order), ref_weights.to(weights.dtype).gather(1, ref_order)))


def identify(gate: nn.Module, top_k: int, logits_of: Callable[[torch.Tensor, tuple], torch.Tensor],
             reproduces: Callable[[tuple, torch.Tensor, torch.Tensor], bool], where: str):
    """The convention that reproduces ``gate``'s own (weights, indices) on probe rows, bit for bit.
    ``logits_of(x, output)`` reads the router logits from a call; ``reproduces(output, weights,
    indices)`` says whether a call's output holds that choice (it raises ValueError for an output
    of another interface). Raises ValueError naming the router when no convention reproduces it
    (the caller turns it into UnsupportedModelError)."""
    weight = gate.weight  # [E, H]; `meta` when accelerate offloads it (its hook loads it per call)
    device = weight.device if weight.device.type != "meta" else torch.device("cpu")
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    x = torch.randn(32, weight.shape[-1], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with torch.no_grad():
        output = gate.forward(x)  # `forward`: no output-capture hooks
        router_logits = logits_of(x, output)
        try:
            for convention in candidates(gate):
                if reproduces(output, *convention.native(gate, router_logits, top_k)):
                    return convention
        except ValueError as error:
            raise ValueError(f"{where} ({type(gate).__name__}) {error}") from None
    raise ValueError(f"{where} ({type(gate).__name__}) routes by a convention this version of bh_routing does "
                     "not know (none of softmax, softmax over the top-k, DeepSeek-V3 grouped sigmoid, Llama-4 "
                     "sigmoid reproduces its output)")
