"""The MoE blocks RoutingPatch knows, in every supported transformers version — the only place that
knows model internals. Two axes, each one small table:

* **Family** (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE): the block's class name, its top-k weight
  convention (renormalised or raw probabilities), a shared expert (Qwen2-MoE), input jitter (Mixtral).
* **Layout** (transformers version): 4.46–4.57 blocks own ``gate = nn.Linear`` and
  ``experts = nn.ModuleList`` and return ``(hidden, router_logits)``; 5.x blocks own a
  ``*TopKRouter`` and fused ``*Experts`` and return ``hidden`` (router logits are recorded from the
  router module's call, so the patched block still *calls* the router module).

What differs *within* a layout between versions is probed once, outside any model call, when a
patch is built: whether the router returns logits or probabilities, whether the model's own loop
calls every expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch as dsp

SUPPORTED_TRANSFORMERS = ((4, 46), (6, 0))  # [min, max)

class UnsupportedModelError(ValueError):
    """The model has no MoE block this module knows, or the transformers version is unsupported."""


# =========================================================================== families


def _norm_topk_prob(block: nn.Module) -> bool:
    # 4.x keeps the flag on the block, 5.x on the router; the module's flag is what the model uses.
    return bool(getattr(block, "norm_topk_prob", getattr(block.gate, "norm_topk_prob", False)))


@dataclass(frozen=True)
class Family:
    """What differs between MoE families — the one place for their quirks."""
    name: str
    block_class: str  # the sparse MoE block's class name (same in transformers 4.x and 5.x)
    renormalizes: Callable[[nn.Module], bool]  # top-k weights rescaled to sum to 1?
    shared_expert: bool = False  # Qwen2-MoE: output += sigmoid(shared_expert_gate(x)) * shared_expert(x)
    jitter: bool = False  # Mixtral: multiplicative input noise while training

    def prepare(self, block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.jitter and block.training and block.jitter_noise > 0:  # in place, as Mixtral does
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - block.jitter_noise,
                                                                      1.0 + block.jitter_noise)
        return hidden_states

    def shared(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's output [T, H] (None without one)."""
        return block.shared_expert(x) if self.shared_expert else None

    def finish(self, block: nn.Module, x: torch.Tensor, out: torch.Tensor,
               shared: torch.Tensor | None) -> torch.Tensor:
        if self.shared_expert:  # op order as the model's (backward accumulates x's gradient in reverse)
            shared = block.shared_expert(x) if shared is None else shared
            return out + torch.sigmoid(block.shared_expert_gate(x)) * shared
        return out


FAMILIES = (
    Family("olmoe", "OlmoeSparseMoeBlock", _norm_topk_prob),
    # softmax over the top-k logits == renormalised top-k probabilities
    Family("mixtral", "MixtralSparseMoeBlock", lambda block: True, jitter=True),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", _norm_topk_prob, shared_expert=True),
    Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", _norm_topk_prob),
)


# =========================================================================== layouts


class ModuleListLayout:
    """transformers 4.46–4.57: ``gate = nn.Linear(H, E)``, ``experts = nn.ModuleList`` of MLPs;
    the block returns ``(hidden [B, S, H], router_logits [T, E])``."""
    name = "modulelist"
    shared_expert_first = False  # Qwen2-MoE: the shared expert runs after the routed ones

    @staticmethod
    def matches(block) -> bool:
        return isinstance(block.gate, nn.Linear) and isinstance(block.experts, nn.ModuleList)

    @staticmethod
    def num_experts(block) -> int:
        return len(block.experts)

    @staticmethod
    def top_k(block) -> int:
        return int(block.top_k)

    @staticmethod
    def router_gives_logits(gate) -> bool:
        return True  # nn.Linear

    @staticmethod
    def logits_from_call(gate, x, output, gives_logits: bool) -> torch.Tensor:
        return output  # nn.Linear: the raw logits

    @staticmethod
    def route(block, x, gives_logits: bool):
        """Call the router; returns (router_logits [T, E], dtype the model mixes weights in)."""
        return block.gate(x), x.dtype

    @staticmethod
    def calls_every_expert(block) -> bool:
        """Whether the model's own forward calls every expert, routed to or not (4.46 loops over all
        of them; later 4.x over the routed ones only, depending on the family). Either way the
        patch must do the same: an expert called on no token gets a zero gradient, one never
        called gets ``grad = None``, and optimizers skip those (no weight decay, no moment update).
        Asked once, on an empty batch, with the original class forward."""
        called = []
        handles = [expert.register_forward_pre_hook(lambda module, args: called.append(module))
                   for expert in block.experts]
        weight = block.gate.weight  # [E, H]
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        try:
            with torch.no_grad():
                type(block).forward(block, torch.zeros(1, 0, weight.shape[1], dtype=weight.dtype, device=device))
        finally:
            for handle in handles:
                handle.remove()
        return len(called) == len(block.experts)

    @staticmethod
    def native(block, x, indices, weights, every_expert: bool) -> torch.Tensor:
        """transformers 4.x's own expert loop, op for op (bit-identical at the native top-k)."""
        out = torch.zeros_like(x)  # [T, H]
        expert_mask = F.one_hot(indices, num_classes=len(block.experts)).permute(2, 1, 0)  # [E, K, T]
        experts = (range(len(block.experts)) if every_expert
                   else (expert_mask.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist())
        for expert in experts:
            slot, token = torch.where(expert_mask[expert])
            current = block.experts[expert](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, current.to(x.dtype))
        return out

    @staticmethod
    def compact(block, x, pairs, cache, every_expert: bool, weights_dtype) -> torch.Tensor:
        return dsp.moe_modules(x, pairs, block.experts, call_unused=every_expert, weights_dtype=weights_dtype)

    @staticmethod
    def compact_unsupported(block) -> str | None:
        return None  # each expert module is called: its own (offload) hooks run

    @staticmethod
    def output(hidden, router_logits):
        return hidden, router_logits


class FusedLayout:
    """transformers 5.x: ``gate = *TopKRouter`` returning ``(logits or probabilities, top-k weights,
    top-k indices)``, ``experts = *Experts`` with ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``
    dispatched by ``config._experts_implementation``; the block returns ``hidden [B, S, H]``."""
    name = "fused"
    shared_expert_first = True  # Qwen2-MoE: the shared expert runs before the router

    @staticmethod
    def matches(block) -> bool:
        return (not isinstance(block.gate, nn.Linear) and isinstance(getattr(block.gate, "weight", None), torch.Tensor)
                and hasattr(block.experts, "gate_up_proj") and hasattr(block.experts, "down_proj"))

    @staticmethod
    def num_experts(block) -> int:
        return int(block.experts.gate_up_proj.shape[0])

    @staticmethod
    def top_k(block) -> int:
        return int(block.gate.top_k)

    @staticmethod
    def router_gives_logits(gate) -> bool:
        """Whether the router's first output is its raw logits (transformers 5.10 on) or the softmax
        probabilities (5.0 up to about 5.9). Asked once per router when the patch is built, outside
        any model call (an extra op inside one would break checkpointing's recomputation), on rows
        x and -x: raw logits of -x are minus those of x, so never two probability rows."""
        weight = gate.weight  # [E, H]; `meta` when accelerate offloads it (its hook loads it per call)
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        x = torch.randn(1, weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(device, dtype)
        with torch.no_grad():
            first = gate.forward(torch.cat([x, -x]))[0].float()  # `forward`: no output-capture hooks
        is_probability = bool((first >= 0).all()) and torch.allclose(first.sum(-1), torch.ones_like(first[:, 0]),
                                                                      atol=1e-3)
        return not is_probability

    @staticmethod
    def logits_from_call(gate, x, output, gives_logits: bool) -> torch.Tensor:
        if gives_logits:
            return output[0]  # the router's own logits: nothing is recomputed
        # 5.0–5.9 return probabilities: recompute the logits with the same op; RoutingPatch refuses
        # this when accelerate offloads the router's weight (it is `meta` outside the router's call).
        weight = gate.weight
        return F.linear(x.to(weight.device), weight)

    @staticmethod
    def route(block, x, gives_logits: bool):
        output = block.gate(x)  # called as a module: output_router_logits hooks see it
        return FusedLayout.logits_from_call(block.gate, x, output, gives_logits), output[1].dtype

    @staticmethod
    def calls_every_expert(block) -> bool:
        return False  # one fused module: every expert weight is one parameter with a gradient

    @staticmethod
    def native(block, x, indices, weights, every_expert: bool) -> torch.Tensor:
        return block.experts(x, indices, weights)

    @staticmethod
    def compact(block, x, pairs, cache, every_expert: bool, weights_dtype) -> torch.Tensor:
        experts = block.experts
        if "gate_fn" not in cache:
            cache["gate_fn"] = getattr(experts, "_apply_gate", None) or dsp.default_gate(experts.act_fn)
        return dsp.moe_fused(x, pairs, experts.gate_up_proj, experts.down_proj, cache["gate_fn"], weights_dtype)

    @staticmethod
    def compact_unsupported(block) -> str | None:
        """Why dispatch='compact' cannot run this block (None if it can): it reads the fused weights
        outside the experts' own call, so they must be in memory and in the usual layout."""
        experts = block.experts
        unusual = {flag: getattr(experts, flag) for flag, usual in
                   (("is_transposed", False), ("has_bias", False), ("has_gate", True),
                    ("is_concatenated", True), ("has_post_expert_norm", False))
                   if getattr(experts, flag, usual) != usual}
        if unusual:
            return f"{type(experts).__name__} has {unusual} (compact supports gate_up_proj [E, 2I, H] / down_proj [E, H, I])"
        if experts.gate_up_proj.device.type == "meta":
            return (f"{type(experts).__name__}'s weights are offloaded (accelerate offload / device_map with "
                    "offload: `meta` outside the experts' own call)")
        return None

    @staticmethod
    def output(hidden, router_logits):
        return hidden


LAYOUTS = (ModuleListLayout, FusedLayout)


# =========================================================================== finding blocks


@dataclass(frozen=True)
class MoeBlock:
    layer: int  # index among the model's MoE blocks
    name: str  # module path, e.g. "model.layers.3.mlp"
    module: nn.Module
    family: Family
    layout: type
    num_experts: int
    top_k: int  # the model's native k


def check_transformers_version(version: str | None = None) -> str:
    """Raise :class:`UnsupportedModelError` outside transformers 4.46 – 5.x; return the version."""
    from packaging.version import Version
    if version is None:
        import transformers
        version = transformers.__version__
    release = Version(version).release[:2]
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= release < high:
        raise UnsupportedModelError(f"transformers {version} is not supported: RoutingPatch knows the MoE blocks of "
                                    f"transformers {low[0]}.{low[1]} up to (not including) {high[0]}.0")
    return version


def find_moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """Every supported sparse MoE block of ``model``, in module order."""
    by_class = {family.block_class: family for family in FAMILIES}
    blocks, unknown = [], []
    for name, module in model.named_modules():
        family = next((by_class[c.__name__] for c in type(module).__mro__ if c.__name__ in by_class), None)
        if family is None:
            if "moe" in type(module).__name__.lower() and "block" in type(module).__name__.lower():
                unknown.append(type(module).__name__)
            continue
        layout = next((lay for lay in LAYOUTS if lay.matches(module)), None)
        if layout is None:
            raise UnsupportedModelError(
                f"{name} ({type(module).__name__}) has neither the transformers 4.x layout (gate = nn.Linear, "
                "experts = nn.ModuleList) nor the 5.x one (router module + fused gate_up_proj/down_proj); "
                "this transformers version changed the block")
        blocks.append(MoeBlock(len(blocks), name, module, family, layout, layout.num_experts(module),
                               layout.top_k(module)))
    if not blocks:
        found = f"; found unsupported MoE-like blocks {sorted(set(unknown))}" if unknown else ""
        raise UnsupportedModelError(f"{type(model).__name__} has no supported MoE block (supported: "
                                    f"{', '.join(f.block_class for f in FAMILIES)}){found}")
    return blocks


def router_gives_logits(block: MoeBlock) -> bool:
    """Probe ``block``'s router once (see ``FusedLayout.router_gives_logits``); refuse a router that
    returns probabilities while accelerate offloads its weight: its logits exist only inside its call."""
    gate = block.module.gate
    gives_logits = block.layout.router_gives_logits(gate)
    if not gives_logits and gate.weight.device.type == "meta":
        raise UnsupportedModelError(
            f"{block.name}.gate is offloaded (its weight is `meta` outside its own call) and, in this "
            "transformers version, returns routing probabilities instead of logits, so the logits cannot be "
            "read: load the model without offload (e.g. a smaller dtype or device_map without 'disk'/'cpu' "
            "offload) or use transformers >= 5.10, whose routers return their logits")
    return gives_logits
