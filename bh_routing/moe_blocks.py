"""The MoE blocks RoutingPatch knows, in every supported transformers version — the only place that
knows model internals. Three axes:

* **Family**: what a block adds around routing — a gated shared expert (Qwen2-MoE, Qwen3-Next), a
  plain one (DeepSeek-V3, GLM-4-MoE; Llama-4's ungated ``shared_expert``), input jitter (Mixtral) —
  read from its child modules, so a new model with the same parts needs no code. A block with parts
  it does not know is refused.
* **Scoring** (:mod:`bh_routing.scoring`): how the router ranks and weights experts (softmax,
  softmax over the top-k, DeepSeek-V3 grouped sigmoid, Llama-4 sigmoid), identified from the
  router's own output.
* **Layout** (transformers version): 4.46–4.57 blocks own ``gate = nn.Linear`` and
  ``experts = nn.ModuleList`` and return ``(hidden, router_logits)`` (known by class name); 5.x
  blocks own a router module (``gate`` or ``router``) returning ``(logits, top-k weights, top-k
  indices)`` and fused ``*Experts`` and return ``hidden`` (GPT-OSS: ``(hidden, weights)``); router
  logits are recorded from the router module's call, so the patched block still *calls* it.
  Llama-4 (4.51 on) has a layout of its own: a router returning ``(dense scores [T, E], logits)``
  and experts that run every token through every expert, the routing weight multiplying the
  expert's *input* (:class:`ScaledInputLayout`).

What differs *within* a layout between versions is probed once, outside any model call, when a
patch is built: whether the router returns logits or probabilities, whether the model's own loop
calls every expert.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch as dsp
from . import scoring

SUPPORTED_TRANSFORMERS = ((4, 46), (6, 0))  # [min, max)

class UnsupportedModelError(ValueError):
    """The model has no MoE block this module knows, or the transformers version is unsupported."""


# =========================================================================== families


def _norm_topk_prob(block: nn.Module) -> bool:
    # 4.x keeps the flag on the block; the module's flag is what the model uses.
    return bool(getattr(block, "norm_topk_prob", getattr(router_of(block), "norm_topk_prob", False)))


# transformers 4.x blocks (gate = nn.Linear): the weight convention lives in the block's forward,
# so these are known by class name. 5.x blocks are recognised by interface (find_moe_blocks).
LEGACY_RENORMALIZES = {"OlmoeSparseMoeBlock": _norm_topk_prob, "Qwen2MoeSparseMoeBlock": _norm_topk_prob,
                       "Qwen3MoeSparseMoeBlock": _norm_topk_prob,
                       "MixtralSparseMoeBlock": lambda block: True}  # softmax over the top-k logits
ROUTER_NAMES = ("gate", "router")  # the child a block routes with
SHARED_NAMES = ("shared_expert", "shared_expert_gate", "shared_experts")


@dataclass(frozen=True)
class Family:
    """What a block adds around routing, read from its interface (child modules and flags)."""
    name: str  # the block's class name
    router_name: str  # "gate" or "router"
    shared: str | None = None  # "gated": + sigmoid(shared_expert_gate(x)) * shared_expert(x)
    #                            (Qwen2-MoE, Qwen3-Next); "plain": + shared_experts(x) (DeepSeek-V3, GLM-4-MoE);
    #                            "ungated": + shared_expert(x) (Llama-4)
    jitter: bool = False  # Mixtral: multiplicative input noise while training

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_name)

    def prepare(self, block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.jitter and block.training and block.jitter_noise > 0:  # in place, as Mixtral does
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - block.jitter_noise,
                                                                      1.0 + block.jitter_noise)
        return hidden_states

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The gated shared expert's output [T, H] where the model computes it before routing."""
        return block.shared_expert(x) if self.shared == "gated" else None

    def finish(self, block: nn.Module, hidden_states: torch.Tensor, x: torch.Tensor, out: torch.Tensor,
               shared: torch.Tensor | None) -> torch.Tensor:
        """``out [T, H]`` plus the shared expert, called as the model calls it: gated on ``x [T, H]``,
        plain on the block input ``hidden_states [B, S, H]`` (a matmul may round by shape)."""
        if self.shared == "gated":  # op order as the model's (backward accumulates x's gradient in reverse)
            shared = block.shared_expert(x) if shared is None else shared
            return out + torch.sigmoid(block.shared_expert_gate(x)) * shared
        if self.shared == "plain":
            return out + block.shared_experts(hidden_states).reshape(out.shape)
        if self.shared == "ungated":  # Llama-4: shared_expert(x) + routed (float addition commutes: same bits)
            return out + block.shared_expert(x)
        return out


def _family(name: str, module: nn.Module) -> Family | str:
    """The block's Family, or why a module holding ``experts`` is not a block we understand."""
    kind = type(module).__name__
    router_name = next((n for n in ROUTER_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
    if router_name is None:
        return f"{name} ({kind}): no router module named {' or '.join(ROUTER_NAMES)}"
    children = {child for child, _ in module.named_children()}
    extra = sorted(children - {router_name, "experts", *SHARED_NAMES})
    if extra:
        return f"{name} ({kind}): unknown parts {extra} would be skipped by the patch"
    if "shared_expert" in children and "shared_expert_gate" in children:
        shared = "gated"
    elif "shared_experts" in children and not children & {"shared_expert", "shared_expert_gate"}:
        shared = "plain"
    elif children & set(SHARED_NAMES) == {"shared_expert"}:
        shared = "ungated"
    elif children & set(SHARED_NAMES):
        return f"{name} ({kind}): a shared expert of unknown form ({sorted(children & set(SHARED_NAMES))})"
    else:
        shared = None
    return Family(kind, router_name, shared, jitter=hasattr(module, "jitter_noise"))


# =========================================================================== layouts


class ModuleListLayout:
    """transformers 4.46–4.57: ``gate = nn.Linear(H, E)``, ``experts = nn.ModuleList`` of MLPs;
    the block returns ``(hidden [B, S, H], router_logits [T, E])``."""
    name = "modulelist"
    shared_expert_first = False  # Qwen2-MoE: the shared expert runs after the routed ones

    @staticmethod
    def matches(block) -> bool:
        return (type(block).__name__ in LEGACY_RENORMALIZES and isinstance(router_of(block), nn.Linear)
                and isinstance(block.experts, nn.ModuleList))

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
        return router_of(block)(x), x.dtype

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
        weight = router_of(block).weight  # [E, H]
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



class FusedLayout:
    """transformers 5.x: ``gate = *TopKRouter`` returning ``(logits or probabilities, top-k weights,
    top-k indices)``, ``experts = *Experts`` with ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``
    dispatched by ``config._experts_implementation``; the block returns ``hidden [B, S, H]``."""
    name = "fused"
    shared_expert_first = True  # Qwen2-MoE: the shared expert runs before the router

    @staticmethod
    def matches(block) -> bool:
        """A router module returning (logits, top-k weights, top-k indices) — it has ``weight`` and
        ``top_k`` and is not a bare nn.Linear — and fused experts called as ``experts(x, indices, weights)``."""
        router = router_of(block)
        return (not isinstance(router, nn.Linear) and isinstance(getattr(router, "weight", None), torch.Tensor)
                and hasattr(router, "top_k") and hasattr(block.experts, "gate_up_proj")
                and hasattr(block.experts, "down_proj"))

    @staticmethod
    def num_experts(block) -> int:
        return int(block.experts.gate_up_proj.shape[0])

    @staticmethod
    def top_k(block) -> int:
        return int(router_of(block).top_k)

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
        output = router_of(block)(x)  # called as a module: output_router_logits hooks see it
        return FusedLayout.logits_from_call(router_of(block), x, output, gives_logits), output[1].dtype

    @staticmethod
    def reproduces(output, weights: torch.Tensor, indices: torch.Tensor) -> bool:
        """Whether the router's ``output`` holds these top-k ``weights``/``indices [T, k]`` (any slot order)."""
        if not (isinstance(output, tuple) and len(output) == 3):   # e.g. 4.x GPT-OSS: (scores, indices)
            raise ValueError("does not return (logits, top-k weights, top-k indices) as transformers 5.x routers "
                             "do: this layout is not supported (use transformers >= 5 for this family)")
        return scoring.same_choice(output[1], output[2], weights, indices)

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



class ScaledInputLayout(FusedLayout):  # its experts' shape and top_k read as FusedLayout's; the rest differs
    """Llama-4 (transformers 4.51 on): ``router = nn.Linear`` subclass with ``top_k`` returning
    ``(scores [T, E], logits [T, E])`` — scores the routing weight of each chosen expert, 0 elsewhere;
    ``experts(x)`` with ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]`` takes *every* token
    through *every* expert (``[E*T, H]`` in, expert-major), each copy scaled by its score first; the
    block sums the E outputs and returns ``(hidden [T, H], router_logits [T, E])``. The weight thus
    multiplies the expert's input, not its output: the dispatch applies it there."""
    name = "scaled_input"
    shared_expert_first = False

    @staticmethod
    def matches(block) -> bool:
        router, experts = router_of(block), block.experts
        return (isinstance(router, nn.Linear) and hasattr(router, "top_k") and hasattr(experts, "gate_up_proj")
                and hasattr(experts, "down_proj")
                and len(inspect.signature(type(experts).forward).parameters) == 2)  # (self, every row)

    @staticmethod
    def router_gives_logits(gate) -> bool:
        return True  # the second output

    @staticmethod
    def logits_from_call(gate, x, output, gives_logits: bool) -> torch.Tensor:
        return output[1]

    @staticmethod
    def route(block, x, gives_logits: bool):
        scores, router_logits = router_of(block)(x)  # as a module: output_router_logits hooks see it
        return router_logits, scores.dtype

    @staticmethod
    def reproduces(output, weights: torch.Tensor, indices: torch.Tensor) -> bool:
        """Whether the router's dense scores are these ``weights [T, k]`` at ``indices`` and 0 elsewhere."""
        scores = output[0]  # [T, E]
        return torch.equal(scores, torch.zeros_like(scores).scatter_(1, indices, weights.to(scores.dtype)))

    @staticmethod
    def calls_every_expert(block) -> bool:
        return False  # one fused module

    @staticmethod
    def native(block, x, indices, weights, every_expert: bool) -> torch.Tensor:
        """The model's own dense path, op for op: every expert on every token, input scaled by the
        token's weight for that expert (0 if not chosen). scatter_add_: a padded slot (PAD_INDEX at
        weight 0) adds an exact 0 to whichever expert it names."""
        num_experts = block.experts.gate_up_proj.shape[0]
        scores = torch.zeros(x.shape[0], num_experts, dtype=weights.dtype, device=x.device)  # [T, E]
        scores = scores.scatter_add(1, indices, weights)
        routed_in = x.repeat(num_experts, 1) * scores.transpose(0, 1).reshape(-1, 1)  # [E*T, H]
        routed_out = block.experts(routed_in)  # [E*T, H]
        return routed_out.reshape(num_experts, -1, routed_out.shape[-1]).sum(dim=0)  # [T, H]

    @staticmethod
    def compact(block, x, pairs, cache, every_expert: bool, weights_dtype) -> torch.Tensor:
        experts = block.experts
        if "gate_fn" not in cache:
            cache["gate_fn"] = getattr(experts, "_apply_gate", None) or dsp.default_gate(experts.act_fn)
        return dsp.moe_fused(x, pairs, experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2),
                             cache["gate_fn"], weights_dtype, weight_inputs=True)

    @staticmethod
    def compact_unsupported(block) -> str | None:
        if block.experts.gate_up_proj.device.type == "meta":
            return (f"{type(block.experts).__name__}'s weights are offloaded (accelerate offload / device_map with "
                    "offload: `meta` outside the experts' own call)")
        return None


LAYOUTS = (ModuleListLayout, FusedLayout, ScaledInputLayout)


# =========================================================================== finding blocks


def router_of(block: nn.Module) -> nn.Module:
    """The block's router module (``gate`` in most families, ``router`` in GPT-OSS and Granite-MoE)."""
    return next(getattr(block, n) for n in ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module))


@dataclass(frozen=True)
class MoeBlock:
    layer: int  # index among the model's MoE blocks
    name: str  # module path, e.g. "model.layers.3.mlp"
    module: nn.Module
    family: Family
    layout: type
    num_experts: int
    top_k: int  # the model's native k
    returns: str  # what the block's forward returns: "hidden", ("hidden", "logits") 4.x, ("hidden", "weights") GPT-OSS

    @property
    def router(self) -> nn.Module:
        return self.family.router(self.module)


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


def _returns(block: nn.Module, layout) -> str:
    """What the block's own forward returns: from its annotation where it has one, otherwise asked
    once on an empty batch (on `meta` when accelerate offloads the block: shapes only)."""
    if layout in (ModuleListLayout, ScaledInputLayout):
        return "logits"
    annotation = inspect.signature(type(block).forward).return_annotation
    if annotation in (torch.Tensor, "torch.Tensor"):
        return "hidden"
    weight = router_of(block).weight  # [E, H]
    device = weight.device
    if device.type == "meta":  # offloaded: accelerate's hooks move inputs to their execution device (GPT-OSS's
        # experts copy theirs there: a meta input would fail), so ask on that device, on 0 tokens
        hooks = [getattr(m, "_hf_hook", None) for m in block.modules()]
        devices = [h.execution_device for h in hooks if getattr(h, "execution_device", None) is not None]
        device = torch.device(devices[0]) if devices else device
    empty = torch.zeros(1, 0, weight.shape[-1], dtype=weight.dtype, device=device)
    with torch.no_grad():
        output = type(block).forward(block, empty)
    return "weights" if isinstance(output, tuple) else "hidden"


def find_moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """Every sparse MoE block of ``model``, in module order, recognised by its interface (see
    ``FusedLayout.matches`` and ``ScaledInputLayout.matches``; 4.x blocks by class name). A module that holds ``experts`` but is not
    understood is refused, named — never silently left native."""
    blocks, unknown = [], []
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "experts", None), nn.Module):
            continue
        layout = next((lay for lay in LAYOUTS if lay.matches(module)), None)
        family = _family(name, module)
        if layout is None or isinstance(family, str):
            unknown.append(family if isinstance(family, str) else
                           f"{name} ({type(module).__name__}): neither a router module returning (logits, top-k "
                           "weights, top-k indices) with fused experts (gate_up_proj/down_proj), nor Llama-4's "
                           "layout, nor a known transformers 4.x block")
            continue
        blocks.append(MoeBlock(len(blocks), name, module, family, layout, layout.num_experts(module),
                               layout.top_k(module), _returns(module, layout)))
    if unknown:
        raise UnsupportedModelError(f"{type(model).__name__} has MoE blocks RoutingPatch does not understand: "
                                    + "; ".join(unknown[:3]) + (f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""))
    if not blocks:
        raise UnsupportedModelError(f"{type(model).__name__} has no supported MoE block (a module with `experts` and a "
                                    "router): nothing to route")
    return blocks


def block_scoring(block: MoeBlock, gives_logits: bool):
    """The block's routing convention (:mod:`bh_routing.scoring`): the legacy table for 4.x blocks,
    identified from the router's own output for 5.x ones."""
    if block.layout is ModuleListLayout:
        return scoring.Softmax(LEGACY_RENORMALIZES[block.family.name](block.module))
    try:
        return scoring.identify(block.router, block.top_k,
                                lambda x, out: block.layout.logits_from_call(block.router, x, out, gives_logits),
                                block.layout.reproduces, f"{block.name}.{block.family.router_name}")
    except ValueError as error:
        raise UnsupportedModelError(str(error)) from None


def router_gives_logits(block: MoeBlock) -> bool:
    """Probe ``block``'s router once (see ``FusedLayout.router_gives_logits``); refuse a router that
    returns probabilities while accelerate offloads its weight: its logits exist only inside its call."""
    gate = block.router
    gives_logits = block.layout.router_gives_logits(gate)
    if not gives_logits and gate.weight.device.type == "meta":
        raise UnsupportedModelError(
            f"{block.name}.{block.family.router_name} is offloaded (its weight is `meta` outside its own call) and, in this "
            "transformers version, returns routing probabilities instead of logits, so the logits cannot be "
            "read: load the model without offload (e.g. a smaller dtype or device_map without 'disk'/'cpu' "
            "offload) or use transformers >= 5.10, whose routers return their logits")
    return gives_logits
