"""Route a loaded Hugging Face MoE model through a bh_routing strategy — scoped and reversible.

    with RoutingPatch(model, {"strategy": "bh", "alpha": 0.05, "pvalues": "zscore"}) as patch:
        out = model(**batch)                    # every MoE block routes with BH
    patch.recorder.counts()                     # [layers, tokens] experts per token

The model internals (families, layouts, finding blocks) live in :mod:`bh_routing.moe_blocks`.

Mode ``"patch"`` replaces each block's forward — per instance, never the class — with one that routes
with the strategy and mixes the chosen experts (``dispatch``: ``"compact"`` computes only the real
(token, expert) pairs, :mod:`bh_routing.dispatch`; ``"native"`` hands the padded routing to the
model's own expert code, numerically exact, no saving; ``"auto"`` = native for fixed-k strategies
and where compact cannot read the expert weights (offloaded), compact otherwise). Mode
``"analyze"`` changes nothing: a forward hook on each router records what the strategy *would*
choose while the model runs natively.

Every function installed on the model is a :class:`~bh_routing.recording.ScopedHook`: copying or
pickling the model while patched is refused. Under gradient checkpointing, backward() after the
patch is removed is refused (its recomputation would route natively).

``layer`` everywhere means the index of a MoE block among the model's MoE blocks (module order) —
the decoder layer index for OLMoE, Mixtral and Qwen3-MoE, and the calibration's layer index.
"""
from __future__ import annotations

import functools
import logging
import warnings
import weakref
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from . import dispatch as dsp
from .moe_blocks import (MoeBlock, UnsupportedModelError, block_scoring,  # noqa: F401 (public here)
                         check_transformers_version, find_moe_blocks, router_gives_logits)
from .recording import RoutingRecorder, ScopedHook, call_context, real_tokens, refuse_fx_tracing
from .selection import Router, build_router, count_non_finite, non_finite_error

logger = logging.getLogger(__name__)

MODES = ("patch", "analyze")
DISPATCHES = ("auto", "compact", "native")

# block module -> the RoutingPatch that holds it. Patches never stack on a block.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, RoutingPatch]" = weakref.WeakKeyDictionary()


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
        self.scoring = {b.layer: block_scoring(b, self._gives_logits[b.layer]) for b in self.blocks}
        for block in self.blocks:
            router = self.routers[block.layer]
            if router.weights_temperature != 1.0 and not self.scoring[block.layer].supports_weights_temperature:
                raise ValueError(f"layer {block.layer}: weights_temperature applies to softmax weights; "
                                 f"{block.family.name} mixes with {self.scoring[block.layer].name} weights "
                                 "(drop weights_temperature)")
        if isinstance(record, RoutingRecorder):
            self._recorder = record
        else:
            self._recorder = RoutingRecorder() if (record or mode == "analyze") else None
        self.num_patched = 0
        self._undo: list[Callable[[], None]] | None = None
        self._finite = _FiniteCheckPerForward()

    @property
    def recorder(self) -> RoutingRecorder:
        """What the patched forward passes routed (AttributeError when created with record=False)."""
        if self._recorder is None:
            raise AttributeError("this RoutingPatch records nothing (it was created with record=False): "
                                 "create it with record=True (the default) to read .recorder")
        return self._recorder

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
                undo.append(self._finite.attach(_base_model(self.model)))
            if self._recorder is not None:
                handles = self._recorder.attach(_base_model(self.model))
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
        router, layer, recorder = self.routers[block.layer], block.layer, self._recorder
        gives_logits, scoring = self._gives_logits[layer], self.scoring[layer]

        def hook(gate, args, output):
            refuse_fx_tracing()
            x = args[0].reshape(-1, args[0].shape[-1])  # [T, H]
            logits = block.layout.logits_from_call(gate, x, output, gives_logits)  # [T, E]
            recorder.record(layer, _route(router, scoring, gate, logits, layer), logits)

        release = self._claim(block)
        handle = block.router.register_forward_hook(ScopedHook(hook, "RoutingPatch"))
        return lambda: (handle.remove(), release())

    def _make_forward(self, block: MoeBlock):
        module, family, layout, layer = block.module, block.family, block.layout, block.layer
        router, recorder, num_experts = self.routers[layer], self._recorder, block.num_experts
        native, gives_logits = self.dispatch[layer] == "native", self._gives_logits[layer]
        scoring, gate, returns = self.scoring[layer], block.router, block.returns
        every_expert = layout.calls_every_expert(module)
        cache: dict = {}  # the compact dispatch's per-block constants
        finite_check = functools.partial(self._finite.add, layer)

        def forward(hidden_states: torch.Tensor):  # [B, S, H]
            refuse_fx_tracing()
            hidden_states = family.prepare(module, hidden_states)
            if family.shared == "plain":  # DeepSeek-V3 order: the router on the block input, then a view
                router_logits, weights_dtype = layout.route(module, hidden_states, gives_logits)  # [T, E]
                x, shared = hidden_states.view(-1, hidden_states.shape[-1]), None  # [T, H]
            else:  # (the order autograd accumulates the input's gradient in, so training matches)
                x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
                shared = family.shared_output(module, x) if layout.shared_expert_first else None  # [T, H]
                router_logits, weights_dtype = layout.route(module, x, gives_logits)  # [T, E]
            routing = _route(router, scoring, gate, router_logits, layer, finite_check)
            if native:  # padded slots: expert PAD_INDEX at weight 0 — correct, computed anyway
                out = layout.native(module, x, routing.indices, routing.weights.to(weights_dtype), every_expert)
            else:
                pairs = dsp.compact_pairs(routing.indices, routing.weights, routing.counts, num_experts)
                out = layout.compact(module, x, pairs, cache, every_expert, weights_dtype)
            out = family.finish(module, hidden_states, x, out, shared)  # [T, H]
            if recorder is not None:
                recorder.record(layer, routing, router_logits)
            out = out.reshape(hidden_states.shape)
            if returns == "hidden":
                return out
            return out, (router_logits if returns == "logits" else routing.weights.to(weights_dtype))
        return forward


def _route(router: Router, scoring, gate: nn.Module, router_logits: torch.Tensor, layer: int,
           finite_check: Callable[[torch.Tensor], None] | None = None):
    """The strategy on the family's selection logits, mixed with the family's weight convention."""
    routing = router(scoring.selection_logits(gate, router_logits), layer=layer,
                     model_renormalizes=scoring.renormalizes(gate), defer_finite_check=finite_check)
    return scoring.mix(gate, router_logits, routing, router)


class _FiniteCheckPerForward:
    """The router logits' NaN/inf check, once per model forward instead of once per MoE layer: a
    host read each, i.e. a GPU sync per layer. Inside the model's forward each patched block adds its
    count of non-finite logits as a device tensor; the model's forward hook reads them all at once
    and raises `check_logits`' error naming the first bad layer, before the output is returned. A
    block called on its own (or recomputed during backward) checks at once."""

    def __init__(self):
        self.in_forward = False
        self.counts: list[tuple[int, torch.Tensor]] = []  # (layer, 0-d long on the device)

    def add(self, layer: int, logits: torch.Tensor) -> None:
        if not self.in_forward:
            bad = int(count_non_finite(logits))
            if bad:
                raise non_finite_error(bad, layer)
            return
        self.counts.append((layer, count_non_finite(logits)))

    def attach(self, base_model: nn.Module) -> Callable[[], None]:
        def before(module, args):
            self.in_forward, self.counts = True, []

        def after(module, args, output):
            counts, self.counts, self.in_forward = self.counts, [], False
            if output is None or not counts:  # output None: the forward raised (the hook runs anyway)
                return
            bad = torch.stack([count for _, count in counts]).tolist()  # the one host read
            for (layer, _), n in zip(counts, bad):
                if n:
                    raise non_finite_error(n, layer)
        handles = [base_model.register_forward_pre_hook(ScopedHook(before, "RoutingPatch")),
                   base_model.register_forward_hook(ScopedHook(after, "RoutingPatch"), always_call=True)]

        def remove():
            for handle in handles:
                handle.remove()
            self.in_forward, self.counts = False, []
        return remove


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
    """Native selection logits per MoE layer (what the strategies rank: the router logits for
    softmax families, see :mod:`bh_routing.scoring`), ``[tokens, experts]`` float32 on the CPU,
    padding removed.

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
        scoring = block_scoring(block, gives_logits)

        def hook(gate, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            logits = block.layout.logits_from_call(gate, x, output, gives_logits).detach()  # [T, E]
            current[block.layer] = scoring.selection_logits(gate, logits)
        return hook

    def pre_hook(mod, args, kwargs):
        context.update(call_context(args, kwargs))

    collected: list[list[torch.Tensor]] = [[] for _ in blocks]
    total = 0
    try:
        for block in blocks:
            handles.append(block.router.register_forward_hook(gate_hook(block, router_gives_logits(block))))
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
