"""Route a loaded Hugging Face MoE model through a bh_routing strategy — scoped and reversible.

    with RoutingPatch(model, {"strategy": "bh", "alpha": 0.05, "pvalues": "zscore"}) as patch:
        out = model(**batch)                    # every MoE block routes with BH
    patch.recorder.counts()                     # [layers, tokens] experts per token

This module is the only place that knows model internals. Two axes, each one small table:

* **Family** (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE): the block's class name, its top-k weight
  convention (renormalised or raw probabilities), a shared expert (Qwen2-MoE), input jitter (Mixtral).
* **Layout** (transformers version): 4.46–4.57 blocks own ``gate = nn.Linear`` and
  ``experts = nn.ModuleList`` and return ``(hidden, router_logits)``; 5.x blocks own a
  ``*TopKRouter`` and fused ``*Experts`` and return ``hidden`` (router logits are recorded from the
  router module's call, so the patched block still *calls* the router module).

Mode ``"patch"`` replaces each block's forward — per instance, never the class — with one that routes
with the strategy and mixes the chosen experts (``dispatch``: ``"compact"`` computes only the real
(token, expert) pairs, :mod:`bh_routing.dispatch`; ``"native"`` hands the padded routing to the
model's own expert code, numerically exact, no saving; ``"auto"`` = native for fixed-k strategies,
compact otherwise). Mode ``"analyze"`` changes nothing: a forward hook on each router records what
the strategy *would* choose while the model runs natively.

``layer`` everywhere means the index of a MoE block among the model's MoE blocks (module order) —
the decoder layer index for OLMoE, Mixtral and Qwen3-MoE, and the calibration's layer index.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch as dsp
from .recording import RoutingRecorder, ScopedHook, call_context, real_tokens, refuse_fx_tracing
from .selection import Router, build_router

logger = logging.getLogger(__name__)

SUPPORTED_TRANSFORMERS = ((4, 46), (6, 0))  # [min, max)
MODES = ("patch", "analyze")
DISPATCHES = ("auto", "compact", "native")

# block module -> the RoutingPatch that holds it. Patches never stack on a block.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, RoutingPatch]" = weakref.WeakKeyDictionary()


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


def _layer_configs(default, layers, num_blocks: int) -> dict[int, object]:
    """Normalise ``layers`` (None = all; an int; an iterable of ints; or {layer: config or None})
    to {layer index: config}; negative indices count from the last MoE block."""
    def index(layer) -> int:
        if not isinstance(layer, int) or not -num_blocks <= layer < num_blocks:
            raise ValueError(f"layer {layer!r} is not a MoE block index of this model (0..{num_blocks - 1}, "
                             "negative counts from the end)")
        return layer % num_blocks

    if isinstance(layers, Mapping):
        pairs = [(index(layer), default if cfg is None else cfg) for layer, cfg in layers.items()]
    else:
        chosen = range(num_blocks) if layers is None else [layers] if isinstance(layers, int) else list(layers)
        pairs = [(index(layer), default) for layer in chosen]
    configs = dict(pairs)
    if len(configs) != len(pairs):
        raise ValueError(f"layers {layers!r} name the same MoE block twice")
    missing = sorted(layer for layer, cfg in configs.items() if cfg is None)
    if missing:
        raise ValueError(f"no routing strategy for layers {missing}: pass strategy_or_config or a config per layer")
    return dict(sorted(configs.items()))


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


def _checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on anywhere in ``model``."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def _base_model(model: nn.Module) -> nn.Module:
    """The module that receives attention_mask / cache for every forward (OlmoeModel in OlmoeForCausalLM)."""
    return getattr(model, "base_model", model)


# =========================================================================== the patch


class RoutingPatch:
    """Scoped, reversible routing intervention on a loaded MoE model.

    Args:
        model: a transformers MoE model (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE; transformers 4.46–5.x).
        strategy_or_config: a :func:`~bh_routing.selection.build_router` config or a built Router,
            used for every chosen layer (may be None if ``layers`` maps each layer to a config).
        mode: ``"patch"`` (route with the strategy) or ``"analyze"`` (run natively, record the
            strategy's choices).
        layers: None (all MoE blocks), an index or iterable of indices (negative from the end, e.g.
            ``range(-4, 0)`` = the last four), or ``{layer: config}`` (None = strategy_or_config).
        record: True (a new :class:`RoutingRecorder` at ``.recorder``), a recorder, or False.
        calibration: :class:`~bh_routing.pvalues.Calibration` for ``empirical``/``pooled`` p-values.
        dispatch: ``"auto"``, ``"compact"`` or ``"native"`` (module docstring).
        verbose: print the one-line summary on apply (it is logged at INFO either way).
    """

    def __init__(self, model: nn.Module, strategy_or_config=None, mode: str = "patch", layers=None,
                 record=True, calibration=None, dispatch: str = "auto", verbose: bool = True):
        self.transformers_version = check_transformers_version()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        self.model, self.mode, self.verbose = model, mode, verbose
        all_blocks = find_moe_blocks(model)
        configs = _layer_configs(strategy_or_config, layers, len(all_blocks))
        self.num_moe_blocks = len(all_blocks)
        self.blocks: list[MoeBlock] = [b for b in all_blocks if b.layer in configs]
        self.routers: dict[int, Router] = {layer: build_router(cfg, calibration) for layer, cfg in configs.items()}
        for block in self.blocks:
            if self.routers[block.layer].max_k > block.num_experts:
                raise ValueError(f"layer {block.layer}: max_k {self.routers[block.layer].max_k} exceeds the "
                                 f"block's {block.num_experts} experts")
        self.dispatch = {b.layer: self._resolve_dispatch(dispatch, b) for b in self.blocks} if mode == "patch" else {}
        self._gives_logits = {b.layer: router_gives_logits(b) for b in self.blocks}
        if isinstance(record, RoutingRecorder):
            self.recorder = record
        else:
            self.recorder = RoutingRecorder() if (record or mode == "analyze") else None
        self.num_patched = 0
        self._undo: list[Callable[[], None]] | None = None

    def _resolve_dispatch(self, dispatch: str, block: MoeBlock) -> str:
        router = self.routers[block.layer]
        unsupported = block.layout.compact_unsupported(block.module)
        if dispatch == "auto":  # no padded slot at fixed k: the model's own path is exact and as cheap
            dispatch = "native" if router.min_k == router.max_k or unsupported else "compact"
        if dispatch == "compact" and unsupported:
            raise UnsupportedModelError(f"dispatch='compact' cannot run {block.name}: {unsupported}; "
                                        "use dispatch='native' (or 'auto')")
        return dispatch

    # ------------------------------------------------------------------ apply / remove

    @property
    def active(self) -> bool:
        return self._undo is not None

    @property
    def layers(self) -> list[int]:
        return [b.layer for b in self.blocks]

    def apply(self) -> "RoutingPatch":
        if self._undo is not None:
            raise RuntimeError("this RoutingPatch is already applied; patches never stack (remove() first)")
        for block in self.blocks:
            owner = _ACTIVE.get(block.module)
            if owner is not None:
                raise RuntimeError(f"{block.name} is already patched by {owner!r}; patches never stack: "
                                   "remove that patch (or leave its `with` block) first")
        undo: list[Callable[[], None]] = []
        try:
            for block in self.blocks:
                undo.append(self._patch_analyze(block) if self.mode == "analyze" else self._patch_forward(block))
            if self.mode == "patch":
                undo.append(self._guard_recomputation(undo).remove)
            if self.recorder is not None:
                handles = self.recorder.attach(_base_model(self.model))
                undo.append(lambda: [h.remove() for h in handles])
        except BaseException:
            for restore in reversed(undo):
                restore()
            raise
        self._undo, self.num_patched = undo, len(self.blocks)
        self._announce()
        return self

    def remove(self) -> None:
        """Restore the exact original forwards and hooks. Safe to call twice."""
        undo, self._undo = self._undo, None
        if undo is None:
            return
        errors = []
        for restore in reversed(undo):
            try:
                restore()
            except Exception as error:  # restore the others anyway
                errors.append(error)
        self.num_patched = 0
        if errors:
            raise errors[0]

    def __enter__(self) -> "RoutingPatch":
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _announce(self) -> None:
        families = sorted({b.family.name for b in self.blocks})
        layouts = sorted({b.layout.name for b in self.blocks})
        dispatches = sorted(set(self.dispatch.values())) if self.dispatch else ["native (analyze)"]
        message = (f"RoutingPatch: {self.mode} {self.num_patched} of {self.num_moe_blocks} MoE blocks "
                   f"({'/'.join(families)}, transformers {self.transformers_version}, {'/'.join(layouts)} experts, "
                   f"dispatch {'/'.join(dispatches)})")
        logger.info(message)
        if self.verbose:
            print(message)

    def __repr__(self) -> str:
        return f"RoutingPatch(mode={self.mode!r}, layers={self.layers}, active={self.active})"

    # ------------------------------------------------------------------ per block

    def _guard_recomputation(self, application: list):
        """Gradient checkpointing recomputes each layer's forward during ``backward()``; after the
        patch is removed that recomputation would route natively (wrong gradients, or a
        CheckpointError). So a forward that may be recomputed — grad enabled, the model training
        with checkpointing on — hooks its final hidden state, which receives its gradient before
        any layer is recomputed: backward() outside this application of the patch is refused there."""
        model = self.model

        def after(module, args, output):
            hidden = output if isinstance(output, torch.Tensor) else output[0]  # [B, S, H]
            if not (torch.is_grad_enabled() and module.training and isinstance(hidden, torch.Tensor)
                    and hidden.requires_grad and _checkpointing(model)):
                return
            def check(grad):
                if self._undo is not application:
                    raise RuntimeError(
                        "backward() ran after the RoutingPatch this forward used was removed, with gradient "
                        "checkpointing on: the recomputed layers would route natively and give wrong gradients. "
                        "Call backward() inside the `with RoutingPatch(...)` block (or before remove()).")
            hidden.register_hook(check)
        return _base_model(model).register_forward_hook(ScopedHook(after, "RoutingPatch"))

    def _claim(self, block: MoeBlock) -> Callable[[], None]:
        _ACTIVE[block.module] = self
        return lambda: _ACTIVE.pop(block.module, None)

    def _patch_forward(self, block: MoeBlock) -> Callable[[], None]:
        module = block.module
        # accelerate's hooks replace `forward` by a wrapper that calls `_old_forward`: swap the inner one.
        attr = "_old_forward" if "_old_forward" in module.__dict__ else "forward"
        had, old = attr in module.__dict__, module.__dict__.get(attr)
        new = ScopedHook(self._make_forward(block), "RoutingPatch")
        release = self._claim(block)
        object.__setattr__(module, attr, new)  # an instance attribute: the class is never touched

        def restore():
            if module.__dict__.get(attr) is not new:
                warnings.warn(f"{block.name}.{attr} was replaced by someone else while patched; "
                              "restoring the pre-patch original anyway", stacklevel=3)
            if had:
                object.__setattr__(module, attr, old)
            else:
                module.__dict__.pop(attr, None)
            release()
        return restore

    def _patch_analyze(self, block: MoeBlock) -> Callable[[], None]:
        router, layer, recorder = self.routers[block.layer], block.layer, self.recorder
        gives_logits = self._gives_logits[layer]
        renormalize = block.family.renormalizes(block.module)

        def hook(gate, args, output):
            refuse_fx_tracing()
            x = args[0].reshape(-1, args[0].shape[-1])  # [T, H]
            logits = block.layout.logits_from_call(gate, x, output, gives_logits)  # [T, E]
            recorder.record(layer, router(logits, layer=layer, model_renormalizes=renormalize), logits)

        release = self._claim(block)
        handle = block.module.gate.register_forward_hook(ScopedHook(hook, "RoutingPatch"))
        return lambda: (handle.remove(), release())

    def _make_forward(self, block: MoeBlock):
        module, family, layout, layer = block.module, block.family, block.layout, block.layer
        router, recorder, num_experts = self.routers[layer], self.recorder, block.num_experts
        native, gives_logits = self.dispatch[layer] == "native", self._gives_logits[layer]
        every_expert = layout.calls_every_expert(module)
        cache: dict = {}  # the compact dispatch's per-block constants

        def forward(hidden_states: torch.Tensor):  # [B, S, H]
            refuse_fx_tracing()
            hidden_states = family.prepare(module, hidden_states)
            x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
            shared = family.shared(module, x) if layout.shared_expert_first else None  # [T, H]
            router_logits, weights_dtype = layout.route(module, x, gives_logits)  # [T, E]
            routing = router(router_logits, layer=layer, model_renormalizes=family.renormalizes(module))
            if native:  # padded slots: expert PAD_INDEX at weight 0 — correct, computed anyway
                out = layout.native(module, x, routing.indices, routing.weights.to(weights_dtype), every_expert)
            else:
                pairs = dsp.compact_pairs(routing.indices, routing.weights, routing.counts, num_experts)
                out = layout.compact(module, x, pairs, cache, every_expert, weights_dtype)
            out = family.finish(module, x, out, shared)  # [T, H]
            if recorder is not None:
                recorder.record(layer, routing, router_logits)
            return layout.output(out.reshape(hidden_states.shape), router_logits)
        return forward


# =========================================================================== calibration helper


def _input_device(model: nn.Module) -> torch.device | None:
    """Where input ids go: the input embeddings' device; None (leave them) when accelerate offloads
    the embeddings — its hook moves the inputs to the execution device itself."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        weight = next(model.parameters())
    return None if weight.device.type == "meta" else weight.device


@torch.no_grad()
def collect_router_logits(model: nn.Module, batches: Iterable, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Native router logits per MoE layer, ``[tokens, experts]`` float32 on the CPU, padding removed.

    ``batches`` yields ``input_ids`` tensors ``[B, S]`` or dicts of model inputs (``input_ids``,
    ``attention_mask``, ...). Stops after ``max_tokens`` real tokens. Feed the result to
    ``Calibration.from_router_logits(logits, top_k=find_moe_blocks(model)[0].top_k)``.
    """
    blocks = find_moe_blocks(model)
    for block in blocks:
        owner = _ACTIVE.get(block.module)
        if owner is not None and owner.mode == "patch":
            raise RuntimeError("calibration needs the model's native routing: remove the RoutingPatch first")
    current: dict[int, torch.Tensor] = {}
    context: dict = {}
    handles = []

    def gate_hook(block, gives_logits):
        def hook(gate, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            current[block.layer] = block.layout.logits_from_call(gate, x, output, gives_logits).detach()
        return hook

    def pre_hook(mod, args, kwargs):
        context.update(call_context(args, kwargs))

    collected: list[list[torch.Tensor]] = [[] for _ in blocks]
    total = 0
    try:
        for block in blocks:
            handles.append(block.module.gate.register_forward_hook(gate_hook(block, router_gives_logits(block))))
        handles.append(_base_model(model).register_forward_pre_hook(pre_hook, with_kwargs=True))
        device = _input_device(model)
        for batch in batches:
            inputs = {"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)
            if device is not None:
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            inputs.setdefault("use_cache", False)
            current.clear()
            model(**inputs)
            keep = real_tokens(context["attention_mask"], context["batch_size"], context["seq_len"],
                               context["past_len"])  # [B*S] or None
            for block in blocks:
                logits = current[block.layer]
                collected[block.layer].append((logits if keep is None else logits[keep.to(logits.device)]).float().cpu())
            total += collected[0][-1].shape[0]
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
    if not collected[0]:
        raise ValueError("collect_router_logits got no batches")
    return [torch.cat(chunks)[:max_tokens] for chunks in collected]
