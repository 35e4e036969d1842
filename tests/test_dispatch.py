"""Host syncs on the patched hot path: the static-shape pair compaction (the grouped GEMM path on
accelerators; forced on the CPU here) and the router logits' NaN/inf check, once per forward.
Every comparison is exact: the new path against the existing one on the same inputs."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import random_calibration, tiny_inputs, tiny_model

from bh_routing import dispatch as dsp
from bh_routing.patching import RoutingPatch, find_moe_blocks


@pytest.fixture
def grouped_on_cpu():
    """Force the grouped GEMM path (and so the static compaction) on the CPU, as on a GPU."""
    dsp.USE_GROUPED_MM, dsp.GROUPED_MM_ON_CPU = True, True
    yield
    dsp.USE_GROUPED_MM, dsp.GROUPED_MM_ON_CPU = True, False


def random_routing(tokens=40, slots=4, num_experts=6, seed=0):
    """indices/weights [T, K], counts [T] with every count 0..K present; padded slots as the contract."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(num_experts, generator=generator)[:slots] for _ in range(tokens)])
    counts = torch.randint(0, slots + 1, (tokens,), generator=generator)
    counts[:slots + 1] = torch.arange(slots + 1)
    real = torch.arange(slots)[None, :] < counts[:, None]
    weights = torch.rand(tokens, slots, generator=generator) * real
    return indices.masked_fill(~real, 0), weights, counts


def test_static_pairs_list_the_compact_pairs_first_then_every_unused_slot():
    indices, weights, counts = random_routing()
    compact = dsp.compact_pairs(indices, weights, counts, 6, static=False)
    static = dsp.compact_pairs(indices, weights, counts, 6, static=True)
    assert static.static and not compact.static and len(static.slot) == indices.numel()
    n = int(counts.sum())
    for name in ("slot", "token", "weight"):
        assert torch.equal(getattr(static, name)[:n], getattr(compact, name)), name
    assert torch.equal(static.per_expert, compact.per_expert) and torch.equal(static.offsets, compact.offsets)
    assert sorted(static.slot.tolist()) == list(range(indices.numel()))          # every cell once
    assert not (torch.arange(indices.shape[1])[None, :] < counts[:, None]).flatten()[static.slot[n:]].any()
    # the grouped GEMM leaves the rows past the last offset unwritten: whatever they hold is ignored
    expert_out = torch.randn(indices.numel(), 5)
    expert_out[n:] = torch.tensor([float("nan"), float("inf"), -1e30, 7.0, 0.0])
    for dtype, weights_dtype in ((torch.float32, None), (torch.bfloat16, torch.float32)):
        assert torch.equal(dsp._combine(expert_out.to(dtype), static, dtype, weights_dtype),
                           dsp._combine(expert_out[:n].to(dtype), compact, dtype, weights_dtype))
    trimmed = static.compacted()
    assert not trimmed.static and all(torch.equal(getattr(trimmed, f), getattr(compact, f)) for f in ("slot", "token", "weight"))
    assert dsp.compact_pairs(indices, weights, counts, 6).static is False      # the CPU default: unchanged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_pairs_through_the_grouped_gemm_are_bit_identical(dtype, grouped_on_cpu):
    """Grouped GEMM on static pairs (its unwritten rows past the last offset masked out) = grouped GEMM
    on the compact pairs, bit for bit; the per-expert fallback on static pairs = the loop on compact ones."""
    torch.manual_seed(0)
    num_experts, hidden, inter = 6, 16, 8
    gate_up = torch.randn(num_experts, 2 * inter, hidden).to(dtype)
    down = torch.randn(num_experts, hidden, inter).to(dtype)
    indices, weights, counts = random_routing(num_experts=num_experts)
    x = torch.randn(len(counts), hidden).to(dtype)
    gate = dsp.default_gate(F.silu)
    static = dsp.compact_pairs(indices, weights, counts, num_experts)
    assert static.static                                                       # the default where grouped runs
    compact = dsp.compact_pairs(indices, weights, counts, num_experts, static=False)
    grouped = dsp.moe_fused(x, compact, gate_up, down, gate)
    assert torch.equal(dsp.moe_fused(x, static, gate_up, down, gate), grouped)
    assert "sizes" not in vars(static)                                         # no host read of the sizes
    dsp.USE_GROUPED_MM = False                                                 # as where torch has no kernel
    assert torch.equal(dsp.moe_fused(x, static, gate_up, down, gate), dsp.moe_fused(x, compact, gate_up, down, gate))
    experts = [lambda rows, e=e: F.linear(gate(F.linear(rows, gate_up[e])), down[e]) for e in range(num_experts)]
    assert torch.equal(dsp.moe_modules(x, static, experts), dsp.moe_modules(x, compact, experts))


def test_patched_model_with_static_pairs_is_bit_identical(grouped_on_cpu, monkeypatch):
    model = tiny_model("olmoe")
    if not hasattr(find_moe_blocks(model)[0].module.experts, "gate_up_proj"):
        pytest.skip("the installed transformers' OLMoE has no fused experts (grouped GEMM path)")
    input_ids, mask = tiny_inputs(batch=3, length=9, left_pad=2)
    config = {"strategy": "ratio", "beta": 0.7, "max_k": 8}
    with torch.no_grad(), RoutingPatch(model, config, dispatch="compact", verbose=False):
        static = model(input_ids, attention_mask=mask).logits
    monkeypatch.setattr(dsp, "compact_pairs", functools.partial(dsp.compact_pairs, static=False))
    with torch.no_grad(), RoutingPatch(model, config, dispatch="compact", verbose=False):
        compact = model(input_ids, attention_mask=mask).logits
    assert torch.equal(static, compact)


STRATEGIES = [{"strategy": "topk", "k": 8}, {"strategy": "top_p", "p": 0.5}, {"strategy": "ratio", "beta": 0.7},
              {"strategy": "bh", "pvalues": "zscore"}, {"strategy": "bh", "pvalues": "empirical"}]


@pytest.mark.parametrize("config", STRATEGIES, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("dispatch", ["native", "compact"])
def test_non_finite_router_logits_fail_once_per_forward_naming_the_first_layer(config, dispatch):
    """NaN router weights in MoE layer 1: the forward raises the clear error naming layer 1 (not a
    later one, nor another error from routing NaN), and returns nothing; a block called on its own
    checks at once; an intact forward afterwards works (no stale state)."""
    model = tiny_model("olmoe")
    input_ids, mask = tiny_inputs()
    block = find_moe_blocks(model)[1]
    calibration = random_calibration(layers=2, experts=block.num_experts)[0]
    pending = []   # deferred checks when the final norm runs: every MoE layer's, none read yet
    model.model.norm.register_forward_hook(lambda *_: pending.append(len(patch._finite.counts)))
    with torch.no_grad(), RoutingPatch(model, config, calibration=calibration, dispatch=dispatch,
                                       verbose=False) as patch:
        reference = model(input_ids, attention_mask=mask).logits
        saved = block.router.weight.clone()
        block.router.weight[3, :] = float("nan")
        with pytest.raises(ValueError, match="router logits of MoE layer 1 contain 14 NaN/inf values"):
            model(input_ids, attention_mask=mask)
        assert pending == [2, 2]
        with pytest.raises(ValueError, match="router logits of MoE layer 1 contain 3 NaN/inf"):
            block.module(torch.randn(1, 3, model.config.hidden_size))
        block.router.weight.copy_(saved)
        assert torch.equal(model(input_ids, attention_mask=mask).logits, reference)
