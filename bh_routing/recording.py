"""Per layer and per token record of the routing: how many experts, which, their weights, and
summaries of the router's distribution — for prompts, teacher-forced passes and ``generate()``.

How tokens are identified
-------------------------
Every forward call of the model is a *step* (``generate()`` makes one prefill step, then one step
per new token). A :class:`RoutingPatch` attaches the recorder to the model with a forward pre-hook
that reads the call's own arguments — ``attention_mask``, ``input_ids``, ``cache_position`` /
``past_key_values`` — so nothing has to be passed by hand:

* padding tokens (attention mask 0) are dropped;
* ``position`` is the token's index in the full sequence, cached tokens included (its column in the
  attention mask), ``batch`` its row;
* ``phase`` is ``"prefill"`` when nothing was cached before the call (a prompt, a teacher-forced
  pass) and ``"decode"`` otherwise.

Blocks run outside a model call (no pre-hook) are recorded as a step of one sequence, no padding.

Memory: during a step only that step's small tensors stay on the device; at the end of the step
they are moved to the CPU. Per token and layer that is a count, ``max_k`` expert ids (int16) and
weights (float32) and two float32 summaries (~50 bytes at max_k = 8); full router logits
(``router_logits=True``, [tokens, experts] float32 per layer) only on request.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

PHASES = ("prefill", "decode")
_FILL = {"count": -1, "experts": -1, "weights": 0.0, "max_prob": np.nan, "entropy": np.nan,
         "router_logits": np.nan}


@dataclass
class _Step:
    index: int
    phase: str
    batch_size: int
    seq_len: int
    past_len: int
    keep: torch.Tensor | None  # [B*S] bool, True for real (non-padding) tokens; None = all real
    token_ids: torch.Tensor | None  # [B*S] long
    pending: dict = field(default_factory=dict)  # layer -> {name: device tensor [B*S, ...]}
    layers: dict = field(default_factory=dict)  # layer -> {name: np.ndarray [n, ...]} once flushed
    meta: dict | None = None  # {"batch", "position", "token_id"}: np.ndarray [n] once flushed


class ScopedHook:
    """A function a patch or recorder installs on a model (a replaced ``forward``, a hook), refusing
    to be copied or pickled: ``copy.deepcopy(model)`` would give a clone that still calls this
    patch's blocks and recorder (and stays patched after the original is restored), and pickling
    (``torch.save(model)``) cannot serialise a live patch."""
    __slots__ = ("function", "owner", "__wrapped__")

    def __init__(self, function, owner: str):
        self.function, self.owner = function, owner
        self.__wrapped__ = function  # inspect.signature() reports the function's own signature

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def _refuse(self, *args):
        raise RuntimeError(
            f"cannot copy or pickle a model while a {self.owner} is attached (copy.deepcopy would share its blocks "
            "and recorder with the original, torch.save(model) cannot save it): leave the `with` block (or call "
            "remove()) first, then copy or save the model and patch the copy; torch.save(model.state_dict()) "
            "works while patched")

    __deepcopy__ = __copy__ = __reduce_ex__ = __reduce__ = _refuse


def refuse_fx_tracing() -> None:
    """torch.fx symbolic tracing (transformers.utils.fx) feeds proxies without values: routing's
    counts, sorting and per-expert shapes, and the recorder's padding, depend on values."""
    tracing = torch.fx._symbolic_trace
    # is_fx_tracing() also answers True under torch.export (and warns so) where the newer name exists
    if getattr(tracing, "is_fx_symbolic_tracing", tracing.is_fx_tracing)():
        raise RuntimeError("torch.fx symbolic tracing of a model under RoutingPatch is not supported: the routing "
                           "and its recording depend on values, which fx proxies do not have. Trace the unpatched "
                           "model, or use torch.compile (fixed k also with fullgraph=True)")


class RoutingRecorder:
    """Collects, per MoE layer and per real token, the routing chosen by a :class:`RoutingPatch`.

    Read it with :meth:`counts` (``[layers, tokens]``), :meth:`tokens` (one row per token),
    :meth:`arrays` (all fields as NumPy) or :meth:`to_frame` (long pandas table, one row per
    (layer, token)). Token order is the same everywhere: step, then batch row, then position.
    """

    def __init__(self, experts: bool = True, weights: bool = True, summaries: bool = True,
                 router_logits: bool = False):
        self.keep_experts, self.keep_weights = experts, weights
        self.keep_summaries, self.keep_logits = summaries, router_logits
        self._steps: list[_Step] = []
        self._current: _Step | None = None

    # ------------------------------------------------------------------ feeding (the patch does this)

    def begin_step(self, batch_size: int, seq_len: int, attention_mask: torch.Tensor | None = None,
                   past_len: int = 0, input_ids: torch.Tensor | None = None) -> None:
        """Start a step of ``batch_size`` sequences of ``seq_len`` new tokens after ``past_len`` cached
        ones. ``attention_mask``: [B, past_len + S] (or [B, S]; its last S columns mark real tokens), a
        4-D mask [B, 1, S, keys] as static caches and custom masks pass (a token is real if it may
        attend to itself, key column past_len + s), or a dict of those (transformers 5.x per
        attention type)."""
        self.end_step()
        keep = real_tokens(attention_mask, batch_size, seq_len, past_len)
        ids = input_ids.reshape(-1) if input_ids is not None and input_ids.numel() == batch_size * seq_len else None
        self._current = _Step(len(self._steps), "prefill" if past_len == 0 else "decode",
                              batch_size, seq_len, past_len, keep, ids)
        self._steps.append(self._current)

    def end_step(self) -> None:
        """Move the current step's records to the CPU (called by the post-forward hook)."""
        if self._current is not None:
            self._flush(self._current)
            self._current = None

    def record(self, layer: int, routing, router_logits: torch.Tensor) -> None:
        """Record one MoE block call: ``routing`` (a :class:`~bh_routing.selection.Routing` over
        T = B*S tokens) and the ``router_logits [T, N]`` it was computed from. Calls made while
        autograd runs a backward pass — gradient checkpointing recomputing a forward — are not
        new tokens and are ignored."""
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:  # inside backward
            return
        num_tokens = routing.counts.shape[0]
        step = self._current
        if (step is None or step.batch_size * step.seq_len != num_tokens
                or layer in step.pending or layer in step.layers):
            self.begin_step(1, num_tokens)  # a block run by hand: one sequence, no padding
            step = self._current
        fields = {"count": routing.counts.detach().to(torch.int16)}
        if self.keep_experts:
            if routing.indices.shape[0] and int(router_logits.shape[-1]) > 32767:
                raise ValueError("more than 32767 experts do not fit the int16 expert ids")
            experts = torch.where(routing.mask, routing.indices, torch.full_like(routing.indices, -1))
            fields["experts"] = experts.detach().to(torch.int16)  # [T, K], -1 at padded slots
        if self.keep_weights:
            fields["weights"] = routing.weights.detach().float()  # [T, K], 0 at padded slots
        if self.keep_summaries:
            logp = torch.log_softmax(router_logits.detach().float(), dim=-1)  # [T, N]
            fields["max_prob"] = logp.amax(dim=-1).exp()
            fields["entropy"] = -(logp.exp() * logp).sum(dim=-1)  # nats; log(N) = uniform router
        if self.keep_logits:
            fields["router_logits"] = router_logits.detach().float()
        step.pending[layer] = fields

    def _flush(self, step: _Step) -> None:
        keep = step.keep
        for layer, fields in step.pending.items():
            step.layers[layer] = {k: (v if keep is None else v[keep.to(v.device)]).cpu().numpy()
                                  for k, v in fields.items()}
        step.pending = {}
        if step.meta is None:
            rows = np.repeat(np.arange(step.batch_size), step.seq_len)
            pos = np.tile(np.arange(step.past_len, step.past_len + step.seq_len), step.batch_size)
            ids = (step.token_ids.cpu().numpy() if step.token_ids is not None
                   else np.full(rows.shape, -1, dtype=np.int64))
            sel = slice(None) if keep is None else keep.cpu().numpy()
            step.meta = {"batch": rows[sel], "position": pos[sel], "token_id": ids[sel]}

    def attach(self, module: torch.nn.Module) -> list:
        """Hook ``module`` (the model, or its base model) so each forward call is one step whose
        padding and positions come from the call's own arguments. Returns the hook handles."""
        def before(mod, args, kwargs):
            refuse_fx_tracing()
            self.begin_step(**call_context(args, kwargs))

        def after(mod, args, kwargs, output):
            self.end_step()
        return [module.register_forward_pre_hook(ScopedHook(before, "RoutingRecorder"), with_kwargs=True),
                module.register_forward_hook(ScopedHook(after, "RoutingRecorder"), with_kwargs=True, always_call=True)]

    # ------------------------------------------------------------------ reading

    def clear(self) -> None:
        self._steps, self._current = [], None

    def _done(self) -> list[_Step]:
        for step in self._steps:
            if step.pending or step.meta is None:
                self._flush(step)
        return [s for s in self._steps if s.layers]

    @property
    def layers(self) -> list[int]:
        """Recorded MoE layer indices, ascending: the rows of :meth:`counts`."""
        return sorted({layer for s in self._done() for layer in s.layers})

    @property
    def num_tokens(self) -> int:
        return sum(len(s.meta["batch"]) for s in self._done())

    def tokens(self):
        """pandas DataFrame, one row per recorded token: step, phase, batch, position, token_id."""
        import pandas as pd
        steps = self._done()
        if not steps:
            return pd.DataFrame({c: [] for c in ("step", "phase", "batch", "position", "token_id")})
        return pd.DataFrame({
            "step": np.concatenate([np.full(len(s.meta["batch"]), s.index) for s in steps]),
            "phase": pd.Categorical(np.concatenate([np.full(len(s.meta["batch"]), s.phase) for s in steps]),
                                    categories=PHASES),
            "batch": np.concatenate([s.meta["batch"] for s in steps]),
            "position": np.concatenate([s.meta["position"] for s in steps]),
            "token_id": np.concatenate([s.meta["token_id"] for s in steps]),
        })

    def arrays(self) -> dict[str, np.ndarray]:
        """All fields as arrays over [layers, tokens(, slots or experts)], rows in :attr:`layers`
        order: ``count`` (-1 where a layer did not record that token), ``experts`` (-1 at padded
        slots), ``weights`` (0 there), ``max_prob``, ``entropy`` and, if kept, ``router_logits``."""
        steps, layers = self._done(), self.layers
        sizes = [len(s.meta["batch"]) for s in steps]
        row_of = {layer: i for i, layer in enumerate(layers)}
        specs: dict[str, tuple] = {}  # name -> (dtype, width of the last axis or None)
        for step in steps:
            for fields in step.layers.values():
                for name, value in fields.items():
                    width = specs.get(name, (None, 0))[1] or 0
                    specs[name] = (value.dtype, max(width, value.shape[1]) if value.ndim == 2 else None)
        out = {name: np.full((len(layers), sum(sizes)) + (() if width is None else (width,)), _FILL[name], dtype)
               for name, (dtype, width) in specs.items()}
        start = 0
        for step, n in zip(steps, sizes):
            for layer, fields in step.layers.items():
                for name, value in fields.items():
                    target = out[name][row_of[layer], start:start + n]
                    target[..., :value.shape[1] if value.ndim == 2 else None] = value
            start += n
        return out

    def counts(self) -> np.ndarray:
        """[layers, tokens] number of experts per token (int16; -1 where a layer did not record)."""
        arrays = self.arrays()
        return arrays.get("count", np.zeros((0, 0), dtype=np.int16))

    def to_frame(self, experts: bool = True):
        """Long pandas table, one row per (layer, token): step, phase, batch, position, token_id,
        layer, count, max_prob, entropy and (``experts=True``) lists ``experts`` / ``weights`` of
        the chosen experts in order of preference."""
        import pandas as pd
        tokens, arrays, layers = self.tokens(), self.arrays(), self.layers
        if not layers:
            return pd.DataFrame(columns=[*tokens.columns, "layer", "count"])
        frame = pd.concat([tokens] * len(layers), ignore_index=True)
        frame.insert(len(tokens.columns), "layer", np.repeat(layers, len(tokens)))
        count = arrays["count"].reshape(-1)
        frame["count"] = count
        for name in ("max_prob", "entropy"):
            if name in arrays:
                frame[name] = arrays[name].reshape(-1)
        if experts:
            for name in ("experts", "weights"):
                if name in arrays:
                    flat = arrays[name].reshape(len(count), -1)
                    frame[name] = [row[:c].tolist() for row, c in zip(flat, np.maximum(count, 0))]
        return frame[count >= 0].reset_index(drop=True)

    def __repr__(self) -> str:
        return f"RoutingRecorder(steps={len(self._steps)}, layers={self.layers}, tokens={self.num_tokens})"


def call_context(args: tuple, kwargs: dict) -> dict:
    """``begin_step`` arguments from a model call's arguments (HF signature order: input_ids,
    attention_mask, ...). Cached length from ``cache_position``, else ``past_key_values``, else the
    attention mask's extra columns."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    source = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if source is None:
        raise ValueError("cannot tell the batch shape: the model was called without input_ids or inputs_embeds")
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    batch_size, seq_len = source.shape[:2]
    past_len = _past_length(kwargs, mask, seq_len)
    return {"batch_size": batch_size, "seq_len": seq_len, "attention_mask": mask, "past_len": past_len,
            "input_ids": input_ids}


def real_tokens(mask, batch_size: int, seq_len: int, past_len: int) -> torch.Tensor | None:
    """[B*S] bool, True for real (non-padding) tokens, from a call's attention mask; None = all real."""
    if isinstance(mask, dict):  # transformers 5.x: {"full_attention": [B, 1, S, keys], ...}
        mask = mask.get("full_attention", next((m for m in mask.values() if isinstance(m, torch.Tensor)), None))
    if not isinstance(mask, torch.Tensor) or mask.shape[0] != batch_size:
        return None
    if mask.dim() == 2 and mask.shape[1] >= seq_len:
        return mask[:, mask.shape[1] - seq_len:].bool().reshape(-1)
    if mask.dim() == 4 and mask.shape[2] == seq_len and mask.shape[3] >= past_len + seq_len:
        # A padding token's own key is masked for every query (itself included); a real one sees itself.
        rows = torch.arange(seq_len, device=mask.device)
        own = mask[:, 0, rows, past_len + rows]  # [B, S]
        allowed = own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2  # additive float mask
        return allowed.reshape(-1)
    return None


def _past_length(kwargs: dict, mask, seq_len: int) -> int:
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5.x renames it `cache`
    if cache is not None:
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuples
            return int(cache[0][0].shape[-2])
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return max(int(mask.shape[1]) - seq_len, 0)
    return 0
