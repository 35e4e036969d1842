"""Expert dispatch for variable-k routing: only the real (token, expert) pairs reach a matmul.

Pure tensor code (no transformers import). A ``Routing`` pads every token to ``K = max_k`` slots;
feeding that to a model's own experts kernel computes the padded slots too (duplicate expert at
weight 0: correct, saves nothing), and out-of-range "sentinel" indices crash or give NaN depending on
the transformers version (DESIGN.md). So we compact the pairs ourselves:

    mask [T, K] -> P = sum(counts) real pairs -> sort by expert -> per expert: gather rows -> MLP
    -> multiply by the routing weight -> sum per token.

Only P rows are multiplied. The per-token sum is deterministic on every device: ``index_add_`` on
the CPU (sequential), a ``[T, K, H]`` slot table summed over K elsewhere (CUDA's ``index_add_``
with repeated indices uses atomics, i.e. a run-to-run varying order).

Two expert layouts are supported:
* a sequence of per-expert MLP modules (transformers 4.x ``nn.ModuleList``): each is *called*, so
  its own forward (and any hooks/quantisation) runs;
* fused weights (transformers 5.x ``*Experts``): ``gate_up_proj [E, 2I, H]`` (gate rows first, then
  up rows), ``down_proj [E, H, I]``, expert e: ``down_e(act(gate_e x) * up_e x)``; with
  ``weight_inputs`` (Llama-4) the routing weight multiplies the expert's input row, not its output.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# Fused layout: torch's grouped GEMM (one call for all experts) on accelerators where torch has a
# kernel for the dtype, the per-expert loop otherwise. Not on the CPU: there torch 2.13's grouped GEMM
# is a loop of the same matmuls in fp32 (equal time) and 1.25x slower than the loop in bf16 at
# OLMoE's shapes (bench/bench_real_shape.py). Module-level switches so tests and benchmarks run both.
USE_GROUPED_MM = True
GROUPED_MM_ON_CPU = False


@dataclass(frozen=True)
class Pairs:
    """The real (token, expert) pairs of a routing, sorted by expert (stable: tokens ascending).
    ``static``: all T*K slots are listed, the real pairs first (rows past ``offsets[-1]`` are unused
    slots, which the grouped GEMM skips): a shape known without reading the device (no sync)."""
    slot: torch.Tensor  # [P] long: flat cell t*K + j of the pair in the [T, K] routing (P = T*K if static)
    token: torch.Tensor  # [P] long
    weight: torch.Tensor  # [P] float32 routing weight
    per_expert: torch.Tensor  # [E] long: pairs per expert
    offsets: torch.Tensor  # [E] int32 cumulative sizes (grouped GEMM offsets)
    num_tokens: int
    num_slots: int  # K
    static: bool = False

    @functools.cached_property
    def sizes(self) -> list[int]:
        """[E] pairs per expert as host ints, for the per-expert slices: a host sync on an
        accelerator, so only read where needed (the grouped GEMM path never does)."""
        return self.per_expert.tolist()

    def compacted(self) -> "Pairs":
        """The real pairs only (a host read of their number if static: a sync on an accelerator)."""
        if not self.static:
            return self
        n = int(self.offsets[-1]) if len(self.offsets) else 0
        return replace(self, slot=self.slot[:n], token=self.token[:n], weight=self.weight[:n], static=False)

    def unused_rows(self) -> torch.Tensor | None:
        """[P, 1] bool, True at the rows of unused slots (static pairs only; else None)."""
        if not self.static:
            return None
        return (torch.arange(len(self.slot), device=self.slot.device) >= self.offsets[-1:])[:, None]


def grouped_mm_planned(device: torch.device) -> bool:
    """Whether the fused experts will run as torch's grouped GEMM on this device (`_grouped`)."""
    return USE_GROUPED_MM and hasattr(F, "grouped_mm") and (device.type != "cpu" or GROUPED_MM_ON_CPU)


def compact_pairs(indices: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                  num_experts: int, static: bool | None = None) -> Pairs:
    """Real pairs of a routing ``indices/weights [T, K]``, ``counts [T]`` (slot j real iff j < counts[t]).

    static: list every slot, unused ones sent to a sentinel expert E after the real pairs (no
    ``nonzero``, whose output size is a host sync on an accelerator); default: where the grouped GEMM
    is planned (`grouped_mm_planned`), which ignores the rows past the last offset. The real pairs
    come in the same order either way, so results are bit-identical."""
    num_tokens, num_slots = indices.shape
    slots = torch.arange(num_slots, device=indices.device)
    real = (slots[None, :] < counts[:, None]).flatten()  # [T*K]
    if grouped_mm_planned(indices.device) if static is None else static:
        sentinel = torch.full_like(indices.flatten(), num_experts)
        expert_sorted, slot = torch.sort(torch.where(real, indices.flatten(), sentinel), stable=True)  # [T*K]
        per_expert = torch.bincount(expert_sorted, minlength=num_experts + 1)[:num_experts]  # [E]
        return Pairs(slot=slot, token=torch.div(slot, num_slots, rounding_mode="floor"),
                     weight=weights.flatten()[slot].float(), per_expert=per_expert,
                     offsets=per_expert.cumsum(0).to(torch.int32), num_tokens=num_tokens, num_slots=num_slots,
                     static=True)
    slot = real.nonzero().squeeze(1)  # [P] flat cells, token-major
    expert = indices.flatten()[slot]  # [P]
    expert_sorted, order = torch.sort(expert, stable=True)
    slot = slot[order]
    per_expert = torch.bincount(expert_sorted, minlength=num_experts)  # [E]
    return Pairs(slot=slot, token=torch.div(slot, num_slots, rounding_mode="floor"),
                 weight=weights.flatten()[slot].float(), per_expert=per_expert,
                 offsets=per_expert.cumsum(0).to(torch.int32), num_tokens=num_tokens, num_slots=num_slots)


def _combine(expert_out: torch.Tensor, pairs: Pairs, dtype: torch.dtype,
             weights_dtype: torch.dtype | None) -> torch.Tensor:
    """Weight each pair's expert output and sum per token: [P, H] -> [T, H] in ``dtype``.

    Precision: the product is taken in the dtype the model mixes in (``weights_dtype``: the
    activation dtype for most blocks, float32 for transformers 5.x Mixtral; None = activation
    dtype), and a token's pairs are summed in float32 and rounded to ``dtype`` once. Eager model
    code instead adds one expert at a time in the activation dtype (a rounding per expert), so in
    bf16/fp16 the two differ by a few units in the last place; in float32 they agree to ~1e-6."""
    hidden = expert_out.shape[-1]
    weighted = _weigh(expert_out, pairs.weight, weights_dtype)  # [P, H]
    unused = pairs.unused_rows()
    if unused is not None:  # the grouped GEMM left those rows unwritten (any value, NaN included): zeros
        weighted = weighted.masked_fill(unused, 0)
    accumulate = torch.promote_types(weighted.dtype, torch.float32)
    if expert_out.device.type == "cpu":  # sequential on the CPU: deterministic, and P rows of traffic only
        total = torch.zeros(pairs.num_tokens, hidden, dtype=accumulate, device=weighted.device)
        return total.index_add_(0, pairs.token, weighted.to(accumulate)).to(dtype)
    # Elsewhere index_add_ with repeated tokens uses atomics (run-to-run varying order): put each
    # pair in its (token, slot) cell and sum the K slots instead.
    cells = weighted.new_zeros(pairs.num_tokens * pairs.num_slots, hidden)  # [T*K, H]
    cells.index_copy_(0, pairs.slot, weighted)
    return cells.view(pairs.num_tokens, pairs.num_slots, hidden).sum(dim=1, dtype=accumulate).to(dtype)


def _weigh(expert_out: torch.Tensor, weight: torch.Tensor, weights_dtype: torch.dtype | None) -> torch.Tensor:
    """Expert outputs ``[n, H]`` times their routing weights ``[n]``, in the mixing dtype."""
    return expert_out * weight.to(weights_dtype or expert_out.dtype)[:, None]


def moe_modules(hidden: torch.Tensor, pairs: Pairs, experts: Sequence[Callable],
                call_unused: bool = False, weights_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mix of per-expert MLP modules: ``hidden [T, H]`` -> ``[T, H]``, P rows computed.
    ``call_unused``: call experts without rows too (on 0 rows), as models whose own loop does so —
    their parameters then get zero gradients, not ``None``."""
    pairs = pairs.compacted()
    rows = hidden[pairs.token]  # [P, H] sorted by expert
    outs = [experts[e](chunk) for e, chunk in enumerate(torch.split(rows, pairs.sizes))
            if chunk.shape[0] or call_unused]
    if not outs:
        return torch.zeros_like(hidden)
    return _combine(torch.cat(outs), pairs, hidden.dtype, weights_dtype)


def default_gate(act_fn: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[P, 2I] -> [P, I]``: act(first half) * second half (gate rows precede up rows)."""
    def gate(gate_up: torch.Tensor) -> torch.Tensor:
        g, u = gate_up.chunk(2, dim=-1)
        return act_fn(g) * u
    return gate


def moe_fused(hidden: torch.Tensor, pairs: Pairs, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
              gate_fn: Callable[[torch.Tensor], torch.Tensor], weights_dtype: torch.dtype | None = None,
              weight_inputs: bool = False) -> torch.Tensor:
    """Mix of fused experts ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``: ``[T, H]`` -> ``[T, H]``.
    ``weight_inputs``: Llama-4's convention, Σ_j expert_j(w_j · x) — each pair's weight multiplies
    the expert's input row (in the mixing dtype, as the model does) and the outputs are summed as they are."""
    rows = hidden[pairs.token]  # [P, H] sorted by expert
    if weight_inputs:
        rows = _weigh(rows, pairs.weight, weights_dtype)
        pairs = replace(pairs, weight=torch.ones_like(pairs.weight))  # x·1 is exact
    rows = rows.to(gate_up_proj.dtype)
    if rows.shape[0] == 0:
        return torch.zeros_like(hidden)
    out = _grouped(rows, pairs, gate_up_proj, down_proj, gate_fn)
    if out is not None:
        return _combine(out, pairs, hidden.dtype, weights_dtype)
    if pairs.static:  # no grouped GEMM after all (e.g. fp16 on CUDA): the loop takes the real pairs only
        pairs = pairs.compacted()
        rows = rows[:len(pairs.token)]
        if rows.shape[0] == 0:
            return torch.zeros_like(hidden)

    def expert(e: int, chunk: torch.Tensor) -> torch.Tensor:  # [n, H] -> [n, H]: one small GEMM pair
        return F.linear(gate_fn(F.linear(chunk, gate_up_proj[e])), down_proj[e])
    if rows.device.type != "cpu":
        return _combine(torch.cat([expert(e, chunk) for e, chunk in enumerate(torch.split(rows, pairs.sizes))
                                   if chunk.shape[0]]), pairs, hidden.dtype, weights_dtype)
    # CPU: each expert's weighted rows go straight into the float32 total: the same additions in the
    # same order as _combine's single index_add_ (bit-identical), without the [P, H] concatenation and
    # its widened copy (~10 % of a bf16 block at T = 512, OLMoE shapes)
    total = None
    per_expert = zip(torch.split(rows, pairs.sizes), torch.split(pairs.token, pairs.sizes),
                     torch.split(pairs.weight, pairs.sizes))
    for e, (chunk, token, weight) in enumerate(per_expert):  # [n, H], [n], [n]
        if chunk.shape[0]:
            weighted = _weigh(expert(e, chunk), weight, weights_dtype)  # [n, H]
            if total is None:
                total = torch.zeros(pairs.num_tokens, weighted.shape[1], device=weighted.device,
                                    dtype=torch.promote_types(weighted.dtype, torch.float32))
            total.index_add_(0, token, weighted.to(total.dtype))
    return total.to(hidden.dtype)


_GROUPED_UNSUPPORTED: set = set()  # (device type, dtype) where torch's grouped GEMM raised


def _grouped(rows, pairs, gate_up_proj, down_proj, gate_fn) -> torch.Tensor | None:
    """Both projections as torch grouped GEMMs over the expert-sorted rows (one call each, no Python
    loop), or None on the CPU (the loop is as fast or faster there) and where torch has no such kernel
    for this device/dtype (e.g. fp16 or pre-sm80 CUDA): tried once per (device, dtype), then the
    per-expert loop is used."""
    key = (rows.device.type, rows.dtype)
    size = rows.element_size()
    if (not grouped_mm_planned(rows.device) or key in _GROUPED_UNSUPPORTED
            or any(t.data_ptr() % 16 for t in (rows, gate_up_proj, down_proj))  # 16-byte aligned rows
            or any(dim * size % 16 for dim in (rows.shape[1], down_proj.shape[-1]))
            or not (gate_up_proj.is_contiguous() and down_proj.is_contiguous())):
        return None
    try:
        up = F.grouped_mm(rows, gate_up_proj.transpose(-2, -1), offs=pairs.offsets)  # [P, 2I]
        return F.grouped_mm(gate_fn(up).contiguous(), down_proj.transpose(-2, -1), offs=pairs.offsets)  # [P, H]
    except (RuntimeError, NotImplementedError, TypeError):
        _GROUPED_UNSUPPORTED.add(key)
        return None
