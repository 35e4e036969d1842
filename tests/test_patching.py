"""RoutingPatch on tiny random MoE models: exact equivalence, exact restore, brute-force mixing.

Runs under every supported transformers (see .ci/compat.sh); what a version lacks is skipped.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import COMPACT_UNSUPPORTED, FAMILIES, TRANSFORMERS_5, tiny_inputs, tiny_model
from bh_routing import dispatch as dsp
from bh_routing.patching import (RoutingPatch, UnsupportedModelError, check_transformers_version,
                                 collect_router_logits, find_moe_blocks)
from bh_routing.selection import build_router

# Variable k with a good spread of counts on the tiny models (1..max_k), deterministic.
def variable(max_k):
    return {"strategy": "ratio", "beta": 0.7, "max_k": max_k}


# The conftest configs' weight conventions, stated independently of bh_routing.scoring:
# softmax probabilities (renormalised or not), a softmax over the chosen logits, DeepSeek-V3 sigmoid.
RENORMALIZES = {"olmoe": False, "mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "flex_olmo": False,
                "qwen3_next": True}
SOFTMAX_OVER_CHOSEN = {"gpt_oss", "granitemoe"}
SIGMOID_GROUPED = {"deepseek_v3", "glm4_moe"}
SIGMOID_ON_INPUT = {"llama4"}  # Llama-4: expert(sigmoid(logit) * x), plus an ungated shared expert


def dispatches(family):
    return ["native"] if family in COMPACT_UNSUPPORTED else ["native", "compact"]


def native_k(model) -> int:
    return find_moe_blocks(model)[0].top_k


def logits(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def forward_attributes(model) -> dict:
    """Instance-level forward attributes of every module (identity matters, not equality)."""
    return {name: (m.__dict__.get("forward"), m.__dict__.get("_old_forward")) for name, m in model.named_modules()}


def assert_same_attributes(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert before[name][0] is after[name][0] and before[name][1] is after[name][1], name


# --------------------------------------------------------------------------- exact equivalence at native top-k


@pytest.mark.parametrize("family", list(FAMILIES))
def test_topk_native_k_is_identical_to_unpatched(family):
    model = tiny_model(family)
    input_ids, mask = tiny_inputs()
    reference = logits(model, input_ids, attention_mask=mask)
    with RoutingPatch(model, {"strategy": "topk", "k": native_k(model)}, verbose=False) as patch:
        assert set(patch.dispatch.values()) == {"native"}
        patched = logits(model, input_ids, attention_mask=mask)
    assert torch.equal(patched, reference)
    if family in COMPACT_UNSUPPORTED:
        return
    with RoutingPatch(model, {"strategy": "topk", "k": native_k(model)}, dispatch="compact", verbose=False):
        compact = logits(model, input_ids, attention_mask=mask)
    assert (compact - reference).abs().max() <= 1e-5  # same math, different summation order


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_topk_identical_under_each_experts_implementation(implementation):
    model = tiny_model("olmoe", experts_implementation=implementation)  # skipped on 4.x
    input_ids, mask = tiny_inputs()
    reference = logits(model, input_ids, attention_mask=mask)
    with RoutingPatch(model, {"strategy": "topk", "k": 8}, verbose=False):
        assert (logits(model, input_ids, attention_mask=mask) - reference).abs().max() <= 1e-6


def test_topk_generate_gives_the_same_tokens(tiny_olmoe):
    input_ids, _ = tiny_inputs(batch=2, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = tiny_olmoe.generate(input_ids, **kwargs)
        with RoutingPatch(tiny_olmoe, {"strategy": "topk", "k": 8}, verbose=False):
            patched = tiny_olmoe.generate(input_ids, **kwargs)
    assert torch.equal(reference, patched)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_output_router_logits_still_returned(family):
    model = tiny_model(family)
    input_ids, mask = tiny_inputs()
    before = forward_attributes(model)
    k = native_k(model)
    with torch.no_grad():
        reference = getattr(model(input_ids, attention_mask=mask, output_router_logits=True), "router_logits", None)
        if reference is None:  # e.g. Llama-4 in transformers 4.57
            pytest.skip(f"{family}: this transformers' model returns no router_logits, patched or not")
        with RoutingPatch(model, {"strategy": "topk", "k": k}, verbose=False):
            same = model(input_ids, attention_mask=mask, output_router_logits=True).router_logits
        with RoutingPatch(model, variable(min(2 * k, 8)), verbose=False):
            varied = model(input_ids, attention_mask=mask, output_router_logits=True).router_logits
    assert len(reference) == len(same) == len(varied) == 2
    for ref, got, var in zip(reference, same, varied):
        assert torch.equal(ref, got)
        assert var.shape == ref.shape  # the layer input changed, so the values may differ
    # 4.57 / 5.0 swap `forward` during output capture: the patch must still restore its own state
    after = forward_attributes(model)
    for name, (forward, old_forward) in before.items():
        assert after[name][1] is old_forward
        assert after[name][0] is forward or getattr(after[name][0], "__func__", None) is type(
            dict(model.named_modules())[name]).forward


def test_dense_layers_are_skipped_and_layers_count_moe_blocks():
    model = tiny_model("qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1])
    blocks = find_moe_blocks(model)
    assert [(b.layer, b.name) for b in blocks] == [(0, "model.layers.0.mlp"), (1, "model.layers.2.mlp")]
    input_ids, mask = tiny_inputs()
    reference = logits(model, input_ids, attention_mask=mask)
    with RoutingPatch(model, {"strategy": "topk", "k": 4}, layers=[-1], verbose=False) as patch:
        assert patch.num_patched == 1 and patch.num_moe_blocks == 2
        assert (logits(model, input_ids, attention_mask=mask) - reference).abs().max() <= 1e-6


# --------------------------------------------------------------------------- exact restore, no stacking


def test_remove_and_with_restore_bit_identical_outputs_and_forwards(tiny_olmoe):
    model = tiny_olmoe
    input_ids, mask = tiny_inputs()
    reference = logits(model, input_ids, attention_mask=mask)
    before = forward_attributes(model)
    class_forwards = {type(b.module): type(b.module).forward for b in find_moe_blocks(model)}
    params = {k: v.clone() for k, v in model.state_dict().items()}

    patch = RoutingPatch(model, variable(8), verbose=False).apply()
    assert patch.active and patch.num_patched == 2
    assert not torch.equal(logits(model, input_ids, attention_mask=mask), reference)
    patch.remove()
    patch.remove()  # twice is harmless
    assert_same_attributes(before, forward_attributes(model))
    assert torch.equal(logits(model, input_ids, attention_mask=mask), reference)

    with pytest.raises(RuntimeError, match="boom"):
        with RoutingPatch(model, variable(8), verbose=False):
            logits(model, input_ids, attention_mask=mask)
            raise RuntimeError("boom")
    assert_same_attributes(before, forward_attributes(model))
    assert torch.equal(logits(model, input_ids, attention_mask=mask), reference)
    assert {cls: cls.forward for cls in class_forwards} == class_forwards  # the class is never touched
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())  # nor a parameter


def test_exception_inside_the_patched_forward_restores(tiny_olmoe):
    input_ids, mask = tiny_inputs()
    reference = logits(tiny_olmoe, input_ids, attention_mask=mask)
    before = forward_attributes(tiny_olmoe)
    router = build_router(variable(8))

    def failing_select(router_logits, layer):
        raise RuntimeError("failed inside the patched block")
    router.select = failing_select
    with pytest.raises(RuntimeError, match="inside the patched block"):
        with RoutingPatch(tiny_olmoe, router, verbose=False) as patch:
            tiny_olmoe(input_ids, attention_mask=mask)
    assert not patch.active
    assert_same_attributes(before, forward_attributes(tiny_olmoe))
    assert torch.equal(logits(tiny_olmoe, input_ids, attention_mask=mask), reference)


def test_patching_twice_is_refused_never_stacked(tiny_olmoe):
    input_ids, mask = tiny_inputs()
    before = forward_attributes(tiny_olmoe)
    with RoutingPatch(tiny_olmoe, {"strategy": "topk", "k": 4}, verbose=False) as patch:
        with pytest.raises(RuntimeError, match="never stack"):
            patch.apply()
        with pytest.raises(RuntimeError, match="never stack"):
            RoutingPatch(tiny_olmoe, {"strategy": "topk", "k": 2}, verbose=False).apply()
        with pytest.raises(RuntimeError, match="never stack"):
            RoutingPatch(tiny_olmoe, {"strategy": "topk", "k": 2}, mode="analyze", verbose=False).apply()
        tiny_olmoe(input_ids, attention_mask=mask)
        assert (patch.recorder.counts() == 4).all()  # still the first patch's routing
    assert_same_attributes(before, forward_attributes(tiny_olmoe))
    with RoutingPatch(tiny_olmoe, {"strategy": "topk", "k": 2}, verbose=False):  # free again
        pass


def test_preexisting_instance_forward_and_accelerate_hooks_are_restored(tiny_olmoe):
    hooks = pytest.importorskip("accelerate.hooks")
    block0, block1 = (b.module for b in find_moe_blocks(tiny_olmoe))
    custom = block0.forward  # a bound method stored on the instance, as 4.57/5.0 output capture leaves
    block0.forward = custom
    hooks.add_hook_to_module(block1, hooks.ModelHook())  # forward -> wrapper calling _old_forward
    before = forward_attributes(tiny_olmoe)
    wrapper = block1.forward
    input_ids, mask = tiny_inputs()
    reference = logits(tiny_olmoe, input_ids, attention_mask=mask)
    with RoutingPatch(tiny_olmoe, variable(8), verbose=False) as patch:
        assert block1.forward is wrapper and block1._old_forward is not before["model.layers.1.mlp"][1]
        tiny_olmoe(input_ids, attention_mask=mask)
        assert (patch.recorder.counts()[1] < 8).any()  # the hooked block really routes through the patch
    assert_same_attributes(before, forward_attributes(tiny_olmoe))
    assert torch.equal(logits(tiny_olmoe, input_ids, attention_mask=mask), reference)
    hooks.remove_hook_from_module(block1)
    assert "_old_forward" not in block1.__dict__


def test_refuses_unsupported_models_and_versions():
    with pytest.raises(UnsupportedModelError, match="no supported MoE block"):
        RoutingPatch(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"strategy": "topk", "k": 1})
    for version in ("4.45.2", "6.0.0", "3.5.0"):
        with pytest.raises(UnsupportedModelError, match="not supported"):
            check_transformers_version(version)
    for version in ("4.46.0", "4.57.6", "5.0.0", "5.23.0"):
        check_transformers_version(version)


def test_per_layer_configs_and_layer_selection(tiny_olmoe):
    input_ids, mask = tiny_inputs()
    with RoutingPatch(tiny_olmoe, {"strategy": "topk", "k": 8}, layers={0: {"strategy": "topk", "k": 2}, -1: None},
                      verbose=False) as patch:
        tiny_olmoe(input_ids, attention_mask=mask)
    counts = patch.recorder.counts()
    assert patch.recorder.layers == [0, 1] and (counts[0] == 2).all() and (counts[1] == 8).all()
    with RoutingPatch(tiny_olmoe, {"strategy": "topk", "k": 3}, layers=range(-1, 0), verbose=False) as patch:
        assert patch.layers == [1] and patch.num_patched == 1
        tiny_olmoe(input_ids, attention_mask=mask)
    assert patch.recorder.layers == [1]
    with pytest.raises(ValueError, match="not a MoE block index"):
        RoutingPatch(tiny_olmoe, {"strategy": "topk", "k": 3}, layers=[5])


# --------------------------------------------------------------------------- variable k vs brute force


def expert_matrices(block, expert: int):
    """(W_gate [I, H], W_up [I, H], W_down [H, I]) of one expert, read from the parameters."""
    experts = block.experts
    if isinstance(experts, torch.nn.ModuleList):  # transformers 4.x
        mlp = experts[expert]
        if hasattr(mlp, "w1"):  # Mixtral: w2(act(w1 x) * w3 x)
            return mlp.w1.weight, mlp.w3.weight, mlp.w2.weight
        return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    if type(experts).__name__ == "Llama4TextExperts":  # gate_up_proj [E, H, 2I] (gate columns, then up), down [E, I, H]
        inter = experts.down_proj.shape[1]
        gate_up = experts.gate_up_proj[expert]
        return gate_up[:, :inter].T, gate_up[:, inter:].T, experts.down_proj[expert].T
    inter = experts.gate_up_proj.shape[1] // 2  # 5.x: gate rows, then up rows
    return experts.gate_up_proj[expert, :inter], experts.gate_up_proj[expert, inter:], experts.down_proj[expert]


def expert_mlp(block, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One expert on one token ``x [H]``, from the parameters (plain math, no model code)."""
    experts = block.experts
    if getattr(experts, "is_transposed", False):  # GPT-OSS: [H, 2I] interleaved gate/up, biases, clamped GLU
        gate_up = x @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]
        gate, up = gate_up[::2].clamp(max=experts.limit), gate_up[1::2].clamp(-experts.limit, experts.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * experts.alpha)) @ experts.down_proj[expert] \
            + experts.down_proj_bias[expert]
    w_gate, w_up, w_down = expert_matrices(block, expert)
    return w_down @ (F.silu(w_gate @ x) * (w_up @ x))


def grouped_selection_logits(router, logits):
    """DeepSeek-V3's ranking, token by token: sigmoid + bias within the best ``topk_group`` groups
    (strength: sum of a group's two best biased scores); others one below the lowest eligible."""
    out = torch.empty_like(logits)
    size = logits.shape[1] // router.num_group
    for t in range(logits.shape[0]):
        biased = torch.sigmoid(logits[t]) + router.e_score_correction_bias
        strength = [float(sum(sorted(biased[g * size:(g + 1) * size].tolist())[-2:])) for g in range(router.num_group)]
        best = sorted(range(router.num_group), key=lambda g: -strength[g])[:router.topk_group]
        eligible = torch.tensor([e // size in best for e in range(logits.shape[1])])
        out[t] = torch.where(eligible, biased, biased[eligible].min() - 1)
    return out


def brute_force_block(block, family: str, x: torch.Tensor, config: dict, layer: int = 0):
    """Σ_j w_tj · expert_{e_tj}(x_t) token by token, each family's weights by hand (+ shared experts)."""
    router_module = getattr(block, "router", None) if family in ("gpt_oss", "granitemoe", "llama4") else block.gate
    logits = x @ router_module.weight.T + (router_module.bias if family == "gpt_oss" else 0)  # [T, E]
    strategy = build_router(config)
    if family in SIGMOID_GROUPED:
        routing = strategy(grouped_selection_logits(router_module, logits), layer=layer)
    else:
        routing = strategy(logits, layer=layer, model_renormalizes=RENORMALIZES.get(family, True))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = routing.indices[t, :int(routing.counts[t])]
        if family in SIGMOID_GROUPED:
            weights = torch.sigmoid(logits[t, chosen])
            weights = weights / weights.sum() if router_module.norm_topk_prob else weights
            weights = weights * router_module.routed_scaling_factor
        elif family in SOFTMAX_OVER_CHOSEN:
            weights = torch.softmax(logits[t, chosen], dim=0)
        elif family in SIGMOID_ON_INPUT:
            weights = torch.sigmoid(logits[t, chosen])
        else:
            weights = routing.weights[t, :len(chosen)]
        for expert, weight in zip(chosen.tolist(), weights):
            if family in SIGMOID_ON_INPUT:
                out[t] += expert_mlp(block, expert, weight * x[t])
            else:
                out[t] += weight * expert_mlp(block, expert, x[t])
    if family in ("qwen2_moe", "qwen3_next", "qwen3_5_moe"):
        shared = block.shared_expert
        mlp = shared.down_proj.weight @ (F.silu(shared.gate_proj.weight @ x.T) * (shared.up_proj.weight @ x.T))
        out += torch.sigmoid(x @ block.shared_expert_gate.weight.T) * mlp.T
    if family in SIGMOID_GROUPED | SIGMOID_ON_INPUT:
        shared = block.shared_experts if family in SIGMOID_GROUPED else block.shared_expert
        out += (shared.down_proj.weight @ (F.silu(shared.gate_proj.weight @ x.T) * (shared.up_proj.weight @ x.T))).T
    return out, routing


@pytest.mark.parametrize("family, dispatch", [(f, d) for f in FAMILIES for d in dispatches(f)])
def test_variable_k_equals_brute_force(family, dispatch):
    model = tiny_model(family)
    block = find_moe_blocks(model)[0].module
    config = variable(min(native_k(model) * 2, 8))
    hidden = model.config.get_text_config().hidden_size
    x = torch.randn(2, 9, hidden, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference, routing = brute_force_block(block, family, x.reshape(-1, hidden), config)
        assert len(set(routing.counts.tolist())) > 1  # really variable
        with RoutingPatch(model, config, dispatch=dispatch, verbose=False) as patch:
            out = block(x.clone())
    out = out[0] if isinstance(out, tuple) else out  # 4.x blocks return (hidden, router_logits)
    assert (out.reshape(-1, hidden) - reference).abs().max() <= 1e-5
    np.testing.assert_array_equal(patch.recorder.counts()[0], routing.counts.numpy())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_variable_k_whole_model_compact_equals_native(family):
    if family in COMPACT_UNSUPPORTED:
        pytest.skip(f"{family}: compact dispatch unsupported (refused, see test_compact_refuses_unusual_fused_layouts)")
    model = tiny_model(family)
    input_ids, mask = tiny_inputs(left_pad=2)
    config = variable(min(native_k(model) * 2, 8))
    with RoutingPatch(model, config, dispatch="native", verbose=False):
        native = logits(model, input_ids, attention_mask=mask)
    with RoutingPatch(model, config, dispatch="compact", verbose=False):
        compact = logits(model, input_ids, attention_mask=mask)
    assert (native - compact).abs().max() <= 1e-5


def test_padded_slots_cost_no_expert_rows(tiny_olmoe):
    """Only Σ counts rows reach the experts' matmuls under the compact dispatch."""
    block = find_moe_blocks(tiny_olmoe)[0].module
    rows = []
    if isinstance(block.experts, torch.nn.ModuleList):
        handles = [e.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0])) for e in block.experts]
    else:
        gate = block.experts._apply_gate  # the fused layout's activation sees every computed row
        block.experts._apply_gate = lambda h: (rows.append(h.shape[0]), gate(h))[1]
        handles = []
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), RoutingPatch(tiny_olmoe, variable(8), layers=[0], verbose=False) as patch:
        block(x)
    for handle in handles:
        handle.remove()
    block.experts.__dict__.pop("_apply_gate", None)
    counts = patch.recorder.counts()[0]
    assert sum(rows) == counts.sum() < 8 * 16


def test_dispatch_functions_compute_only_real_pairs():
    torch.manual_seed(0)
    num_experts, hidden, inter, tokens, slots = 6, 8, 5, 10, 4
    gate_up, down = torch.randn(num_experts, 2 * inter, hidden), torch.randn(num_experts, hidden, inter)
    x = torch.randn(tokens, hidden)
    counts = torch.tensor([0, 1, 2, 3, 4, 4, 3, 2, 1, 0])
    indices = torch.stack([torch.randperm(num_experts)[:slots] for _ in range(tokens)])
    weights = torch.rand(tokens, slots)
    pairs = dsp.compact_pairs(indices, weights, counts, num_experts)
    assert len(pairs.token) == counts.sum() and sum(pairs.sizes) == counts.sum()
    seen = []

    def gate(h):
        seen.append(h.shape[0])
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u
    for grouped in (True, False):  # the grouped GEMM (forced on the CPU, where it is off by default), the loop
        dsp.USE_GROUPED_MM, dsp.GROUPED_MM_ON_CPU = grouped, grouped
        try:
            out = dsp.moe_fused(x, pairs, gate_up, down, gate)
        finally:
            dsp.USE_GROUPED_MM, dsp.GROUPED_MM_ON_CPU = True, False
        reference = torch.zeros_like(x)
        for t in range(tokens):
            for j in range(int(counts[t])):
                e = int(indices[t, j])
                h = F.silu(gate_up[e, :inter] @ x[t]) * (gate_up[e, inter:] @ x[t])
                reference[t] += weights[t, j] * (down[e] @ h)
        assert (out - reference).abs().max() <= 1e-4
        assert sum(seen) == counts.sum()
        seen.clear()
    mlps = [torch.nn.Linear(hidden, hidden) for _ in range(num_experts)]
    out = dsp.moe_modules(x, pairs, mlps)
    reference = torch.stack([sum((weights[t, j] * mlps[int(indices[t, j])](x[t]) for j in range(int(counts[t]))),
                                 torch.zeros(hidden)) for t in range(tokens)])
    assert (out - reference).abs().max() <= 1e-5


# --------------------------------------------------------------------------- analyze mode, cache


def test_analyze_mode_leaves_outputs_identical_and_records_bh(tiny_olmoe):
    input_ids, mask = tiny_inputs()
    reference = logits(tiny_olmoe, input_ids, attention_mask=mask)
    config = {"strategy": "bh", "alpha": 0.5, "pvalues": "zscore", "max_k": 8}
    with RoutingPatch(tiny_olmoe, config, mode="analyze", verbose=False) as patch:
        assert torch.equal(logits(tiny_olmoe, input_ids, attention_mask=mask), reference)
    counts = patch.recorder.counts()
    assert counts.shape == (2, int(mask.sum()))
    blocks = [b.module for b in find_moe_blocks(tiny_olmoe)]
    inputs = []  # each MoE block's input in an unpatched forward
    handles = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in blocks]
    logits(tiny_olmoe, input_ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    for layer, (block, x) in enumerate(zip(blocks, inputs)):
        router_logits = x.reshape(-1, x.shape[-1]) @ block.gate.weight.T
        np.testing.assert_array_equal(counts[layer], build_router(config)(router_logits, layer=layer).counts.numpy())
    assert counts.min() >= 1 and len(np.unique(counts)) > 1


def test_generate_with_cache_equals_without_cache_under_variable_k(tiny_olmoe):
    input_ids, _ = tiny_inputs(batch=2, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), RoutingPatch(tiny_olmoe, variable(8), verbose=False) as patch:
        cached = tiny_olmoe.generate(input_ids, use_cache=True, **kwargs)
        uncached = tiny_olmoe.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert len(np.unique(patch.recorder.counts())) > 1


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the fused layout exists from transformers 5.0")
def test_compact_refuses_unusual_fused_layouts(tiny_olmoe):
    block = find_moe_blocks(tiny_olmoe)[0].module
    block.experts.is_transposed = True
    try:
        with pytest.raises(UnsupportedModelError, match="dispatch='native'"):
            RoutingPatch(tiny_olmoe, variable(8), dispatch="compact", verbose=False)
        assert RoutingPatch(tiny_olmoe, variable(8), verbose=False).dispatch[0] == "native"  # auto falls back
    finally:
        block.experts.is_transposed = False


# --------------------------------------------------------------------------- accelerate offload and device maps


def router_returns_probabilities(model) -> bool:
    """transformers 5.0–5.9 routers return softmax probabilities where later ones return logits."""
    with torch.no_grad():
        first = model(tiny_inputs()[0], output_router_logits=True).router_logits[0]
    return bool(first.min() >= 0)


def offloaded(model, how: str, folder):
    """``model`` reloaded from disk with accelerate keeping its weights off the module (``meta``
    outside each module's own call): ``cpu_offload`` or ``from_pretrained(device_map=...)`` with
    layer 0 on disk."""
    accelerate = pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    model.save_pretrained(folder / "saved")
    if how == "cpu_offload":
        return accelerate.cpu_offload(AutoModelForCausalLM.from_pretrained(folder / "saved").eval(),
                                      execution_device="cpu")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.norm": "cpu", "lm_head": "cpu"}
    if "model.rotary_emb" in dict(model.named_modules()):
        device_map["model.rotary_emb"] = "cpu"
    return AutoModelForCausalLM.from_pretrained(folder / "saved", device_map=device_map,
                                                offload_folder=folder / "offload").eval()


@pytest.mark.parametrize("how", ["cpu_offload", "disk"])
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_offloaded_models_route_exactly_as_in_memory(family, how, tmp_path):
    """The router logits come from the router's own call: recomputing them from `gate.weight`
    afterwards read `meta` (uninitialised memory or NaN) under offload, without an error."""
    model = tiny_model(family)
    input_ids, mask = tiny_inputs(left_pad=2)
    loaded = offloaded(model, how, tmp_path)
    block = find_moe_blocks(loaded)[0].module
    assert all(p.device.type == "meta" for p in block.parameters())  # really offloaded
    if router_returns_probabilities(model):  # transformers 5.0–5.9: the logits exist only inside the call
        with pytest.raises(UnsupportedModelError, match="offloaded.*returns routing probabilities"):
            RoutingPatch(loaded, {"strategy": "topk", "k": 2}, verbose=False)
        return
    k = native_k(model)
    for config in ({"strategy": "topk", "k": k}, variable(min(2 * k, 8))):
        with RoutingPatch(model, config, verbose=False) as reference:
            expected = logits(model, input_ids, attention_mask=mask)
        with RoutingPatch(loaded, config, verbose=False) as patch:
            assert patch.dispatch[0] == "native" or not TRANSFORMERS_5  # compact needs the weights in memory
            got = logits(loaded, input_ids, attention_mask=mask)
        assert (got - expected).abs().max() <= 1e-5, config
        np.testing.assert_array_equal(patch.recorder.counts(), reference.recorder.counts())
    assert (logits(loaded, input_ids, attention_mask=mask) - logits(model, input_ids, attention_mask=mask)
            ).abs().max() <= 1e-6  # and restored
    bh = {"strategy": "bh", "alpha": 0.5, "pvalues": "zscore", "max_k": 8}
    with RoutingPatch(model, bh, mode="analyze", verbose=False) as reference:
        logits(model, input_ids, attention_mask=mask)
    with RoutingPatch(loaded, bh, mode="analyze", verbose=False) as patch:
        logits(loaded, input_ids, attention_mask=mask)
    np.testing.assert_array_equal(patch.recorder.counts(), reference.recorder.counts())
    batches = [{"input_ids": input_ids, "attention_mask": mask}]
    for got, expected in zip(collect_router_logits(loaded, batches), collect_router_logits(model, batches)):
        assert torch.equal(got, expected)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the fused layout exists from transformers 5.0")
def test_compact_dispatch_of_offloaded_fused_experts_is_refused_with_advice(tmp_path):
    loaded = offloaded(tiny_model("olmoe"), "cpu_offload", tmp_path)
    with pytest.raises(UnsupportedModelError, match="offloaded.*dispatch='native'"):
        RoutingPatch(loaded, variable(8), dispatch="compact", verbose=False)


# --------------------------------------------------------------------------- training: checkpointing, gradients


def parameter_grads(model, input_ids, config=None, checkpointing=None, backward_inside=True, patch_out=None):
    """Gradients of the LM loss on ``input_ids`` (training mode), unpatched or under ``config``;
    ``checkpointing``: None (off) or use_reentrant True / False."""
    model.train()
    model.zero_grad(set_to_none=True)
    if checkpointing is not None and hasattr(model, "activation_checkpointing_enable"):  # its 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": checkpointing})
    elif checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    if config is None:
        model(input_ids, labels=input_ids, use_cache=False).loss.backward()
    else:
        with RoutingPatch(model, config, verbose=False) as patch:
            loss = model(input_ids, labels=input_ids, use_cache=False).loss
            if backward_inside:
                loss.backward()
        if patch_out is not None:
            patch_out.append(patch)
        if not backward_inside:
            loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(reentrant):
    """The patch's first forward under checkpointing is recomputed op for op (no one-time probe
    inside it), and the recomputation is not recorded as new tokens."""
    input_ids, _ = tiny_inputs()
    reference = parameter_grads(tiny_model("olmoe"), input_ids)
    topk = parameter_grads(tiny_model("olmoe"), input_ids, {"strategy": "topk", "k": 8}, checkpointing=reentrant)
    varied = variable(8)
    plain_varied = parameter_grads(tiny_model("olmoe"), input_ids, varied)
    patches = []
    checkpointed_varied = parameter_grads(tiny_model("olmoe"), input_ids, varied, checkpointing=reentrant,
                                          patch_out=patches)
    for name, grad in reference.items():
        assert torch.equal(topk[name], grad), name
        assert torch.equal(checkpointed_varied[name], plain_varied[name]), name
    counts = patches[0].recorder.counts()
    assert counts.shape == (2, input_ids.numel()) and len(np.unique(counts)) > 1  # one forward's tokens


@pytest.mark.parametrize("reentrant", [False, True])
def test_backward_after_leaving_the_patch_under_checkpointing_is_refused(reentrant):
    """Its recomputation would route natively (silently different gradients with use_reentrant=True)."""
    input_ids, _ = tiny_inputs()
    with pytest.raises(RuntimeError, match=r"backward\(\) ran after the RoutingPatch"):
        parameter_grads(tiny_model("olmoe"), input_ids, variable(8),
                        checkpointing=reentrant, backward_inside=False)
    model = tiny_model("olmoe")  # without checkpointing nothing is recomputed: backward afterwards is fine
    inside = parameter_grads(model, input_ids, variable(8))
    after = parameter_grads(tiny_model("olmoe"), input_ids, variable(8),
                            backward_inside=False)
    assert all(torch.equal(after[name], grad) for name, grad in inside.items() if grad is not None)


# --------------------------------------------------------------------------- copies and saves


@pytest.mark.parametrize("mode", ["patch", "analyze"])
def test_copying_or_saving_a_patched_model_is_refused_and_works_after(tiny_olmoe, mode, tmp_path):
    """A deep copy would keep calling the original's blocks and recorder (and stay patched)."""
    import copy
    input_ids, mask = tiny_inputs()
    reference = logits(tiny_olmoe, input_ids, attention_mask=mask)
    with RoutingPatch(tiny_olmoe, variable(8), mode=mode, verbose=False):
        with pytest.raises(RuntimeError, match="cannot copy or pickle a model while"):
            copy.deepcopy(tiny_olmoe)
        with pytest.raises(RuntimeError, match="cannot copy or pickle a model while"):
            torch.save(tiny_olmoe, tmp_path / "model.pt")
        torch.save(tiny_olmoe.state_dict(), tmp_path / "state.pt")  # the weights are untouched: fine
        tiny_olmoe.save_pretrained(tmp_path / "saved")
    clone = copy.deepcopy(tiny_olmoe)
    torch.save(tiny_olmoe, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (clone, loaded):
        assert torch.equal(logits(other, input_ids, attention_mask=mask), reference)
    assert all(torch.equal(v, tiny_olmoe.state_dict()[k]) for k, v in torch.load(tmp_path / "state.pt").items())
    reloaded = type(tiny_olmoe).from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(logits(reloaded, input_ids, attention_mask=mask), reference)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_step_at_native_k_equals_unpatched(family):
    """Unused experts get the gradients the model's own loop gives them (zeros where it calls every
    expert, None where it skips them), so one AdamW step with weight decay matches exactly."""
    input_ids, _ = tiny_inputs()
    states = []
    for patched in (False, True):
        model = tiny_model(family)
        grads = parameter_grads(model, input_ids, {"strategy": "topk", "k": native_k(model)} if patched else None)
        states.append(({name: grad is None for name, grad in grads.items()}, model))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        optimizer.step()
    (none_reference, reference), (none_patched, patched) = states
    assert none_patched == none_reference
    for (name, expected), got in zip(reference.state_dict().items(), patched.state_dict().values()):
        assert torch.equal(got, expected), name


# --------------------------------------------------------------------------- torch.compile and torch.fx


@pytest.mark.parametrize("config, fullgraph", [({"strategy": "topk", "k": 4}, True), (variable(8), False)])
def test_torch_compile_gives_the_eager_routing(tiny_olmoe, config, fullgraph):
    """Fixed k compiles as one graph (no data-dependent check left in the router's path); variable k
    compiles with graph breaks around its data-dependent shapes. The recorder still records."""
    input_ids, mask = tiny_inputs(left_pad=2)

    def compiled():
        torch._dynamo.reset()
        return torch.compile(tiny_olmoe, fullgraph=fullgraph, backend="eager")(input_ids, attention_mask=mask)
    with torch.no_grad(), RoutingPatch(tiny_olmoe, config, verbose=False) as patch:
        eager = tiny_olmoe(input_ids, attention_mask=mask).logits
        eager_tokens, eager_counts = patch.recorder.tokens(), patch.recorder.counts()
        patch.recorder.clear()
        try:
            out = compiled().logits
        except Exception:
            patch.remove()
            try:
                compiled()
            except Exception as error:  # e.g. 5.0's grouped_mm experts under compile on the CPU
                pytest.skip(f"this transformers' model does not compile unpatched either: {error}"[:200])
            raise
    torch._dynamo.reset()
    assert torch.equal(out, eager)
    assert patch.recorder.tokens().equals(eager_tokens)
    np.testing.assert_array_equal(patch.recorder.counts(), eager_counts)


@pytest.mark.parametrize("mode", ["patch", "analyze"])
def test_fx_tracing_a_patched_model_is_refused_with_a_reason(mode):
    fx = pytest.importorskip("transformers.utils.fx")
    model = tiny_model("mixtral")
    try:
        fx.symbolic_trace(model, input_names=["input_ids", "attention_mask"])
    except Exception as error:  # this transformers cannot trace the model at all
        pytest.skip(f"transformers.utils.fx cannot trace the unpatched model here: {error}"[:200])
    with RoutingPatch(model, {"strategy": "topk", "k": 2}, mode=mode, verbose=False):
        with pytest.raises(RuntimeError, match="torch.fx symbolic tracing of a model under RoutingPatch"):
            fx.symbolic_trace(model, input_names=["input_ids", "attention_mask"])


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("implementation", [None, "eager"])  # None: the version's default
@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe"])
def test_compact_dispatch_precision_in_bfloat16(family, implementation):
    """Compact weights each pair in the model's mixing dtype and sums a token's experts in float32,
    rounding once. Where the model's own expert code does the same (transformers 5.x grouped_mm /
    batched_mm) it is bit-identical; eager code (4.x, 5.x eager) rounds after every expert, and
    compact is then at least as close to the exact sum of the same bf16 expert outputs."""
    model = tiny_model(family, experts_implementation=implementation).to(torch.bfloat16)
    block = find_moe_blocks(model)[0].module
    x = torch.randn(1, 128, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    k = native_k(model)
    with torch.no_grad():
        outputs = {}
        for dispatch in ("native", "compact"):
            with RoutingPatch(model, {"strategy": "topk", "k": k}, dispatch=dispatch, layers=[0], verbose=False) as patch:
                out = block(x)
            outputs[dispatch] = (out[0] if isinstance(out, tuple) else out).reshape(-1, 64).double()
    implementation = getattr(model.config, "_experts_implementation", None)
    if implementation in ("grouped_mm", "batched_mm"):
        assert torch.equal(outputs["compact"], outputs["native"])
        return
    arrays = patch.recorder.arrays()  # the routing both runs used: experts and float32 weights
    exact = torch.zeros_like(outputs["native"])  # Σ_j bf16(w_tj · bf16 expert output), summed exactly
    for t in range(exact.shape[0]):
        for e, w in zip(arrays["experts"][0, t], arrays["weights"][0, t]):
            w_gate, w_up, w_down = expert_matrices(block, int(e))
            h = F.silu(F.linear(x[0, t], w_gate)) * F.linear(x[0, t], w_up)  # bf16, as the experts compute
            exact[t] += (F.linear(h, w_down) * torch.tensor(float(w)).to(torch.bfloat16)).double()
    errors = {d: (out - exact).abs().mean().item() for d, out in outputs.items()}
    assert errors["compact"] <= errors["native"], errors
    assert (outputs["compact"] - outputs["native"]).abs().max() <= 4 * 2 ** -8 * exact.abs().max()  # a few ulp


def test_grouped_dispatch_needs_no_host_sizes():
    """The grouped GEMM path reads the per-expert counts on the device only (no host sync for them):
    forced on the CPU, it matches the per-expert loop without ever materialising ``pairs.sizes``."""
    torch.manual_seed(0)
    num_experts, hidden, inter, tokens, slots = 4, 16, 8, 12, 3
    gate_up, down = torch.randn(num_experts, 2 * inter, hidden), torch.randn(num_experts, hidden, inter)
    x = torch.randn(tokens, hidden)
    indices = torch.stack([torch.randperm(num_experts)[:slots] for _ in range(tokens)])
    counts = torch.randint(1, slots + 1, (tokens,))

    def gate(h):
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u
    weights = torch.rand(tokens, slots)
    grouped_pairs = dsp.compact_pairs(indices, weights, counts, num_experts)
    dsp.GROUPED_MM_ON_CPU = True
    try:
        grouped = dsp.moe_fused(x, grouped_pairs, gate_up, down, gate)
    finally:
        dsp.GROUPED_MM_ON_CPU = False
    assert "sizes" not in vars(grouped_pairs)
    loop_pairs = dsp.compact_pairs(indices, weights, counts, num_experts)
    looped = dsp.moe_fused(x, loop_pairs, gate_up, down, gate)
    assert "sizes" in vars(loop_pairs)
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_loop_accumulates_exactly_as_one_combine(dtype):
    """On the CPU the per-expert loop adds each expert's weighted rows straight into the total: the
    result is bit-identical to concatenating every expert's output and summing once (`_combine`)."""
    torch.manual_seed(1)
    num_experts, hidden, inter, tokens, slots = 5, 16, 8, 20, 4
    gate_up = torch.randn(num_experts, 2 * inter, hidden).to(dtype)
    down = torch.randn(num_experts, hidden, inter).to(dtype)
    x = torch.randn(tokens, hidden).to(dtype)
    indices = torch.stack([torch.randperm(num_experts)[:slots] for _ in range(tokens)])
    pairs = dsp.compact_pairs(indices, torch.rand(tokens, slots), torch.randint(0, slots + 1, (tokens,)), num_experts)
    gate = dsp.default_gate(F.silu)
    rows = x[pairs.token]
    outs = torch.cat([F.linear(gate(F.linear(chunk, gate_up[e])), down[e])
                      for e, chunk in enumerate(torch.split(rows, pairs.sizes)) if chunk.shape[0]])
    for weights_dtype in (None, torch.float32):
        expected = dsp._combine(outs, pairs, dtype, weights_dtype)
        assert torch.equal(dsp.moe_fused(x, pairs, gate_up, down, gate, weights_dtype), expected)
