"""Every family in conftest.FAMILIES through RoutingPatch: generate with cache, exact restore, the
compact dispatch's row count; blocks not understood are refused by name."""
from __future__ import annotations

import pytest
import torch

from conftest import COMPACT_UNSUPPORTED, FAMILIES, FIVE_X_ONLY, TRANSFORMERS_5, family_config, tiny_inputs, tiny_model
from bh_routing.patching import RoutingPatch, UnsupportedModelError, find_moe_blocks


def variable(max_k):
    return {"strategy": "ratio", "beta": 0.7, "max_k": max_k}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_with_cache_at_native_k_and_exact_restore(family):
    model = tiny_model(family)
    input_ids, _ = tiny_inputs(batch=2, length=5)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        reference = model.generate(input_ids, **kwargs)
        reference_logits = model(input_ids).logits
        with RoutingPatch(model, {"strategy": "topk", "k": find_moe_blocks(model)[0].top_k}, verbose=False) as patch:
            patched = model.generate(input_ids, **kwargs)
        assert torch.equal(reference, patched)
        assert patch.recorder.counts()[0].sum() > 0
        with RoutingPatch(model, variable(8), verbose=False):
            model(input_ids)
        assert torch.equal(model(input_ids).logits, reference_logits)  # restored exactly
    assert all("forward" not in m.__dict__ for m in model.modules() if hasattr(m, "experts"))
    assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in COMPACT_UNSUPPORTED])
def test_compact_dispatch_computes_only_the_chosen_rows(family):
    model = tiny_model(family)
    block = find_moe_blocks(model)[0].module
    rows = []
    if isinstance(block.experts, torch.nn.ModuleList):
        handles = [e.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0])) for e in block.experts]
    else:
        gate = getattr(block.experts, "_apply_gate", None) or (lambda h: (lambda g, u: block.experts.act_fn(g) * u)(
            *h.chunk(2, dim=-1)))
        block.experts._apply_gate = lambda h: (rows.append(h.shape[0]), gate(h))[1]
        handles = []
    x = torch.randn(1, 16, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), RoutingPatch(model, variable(8), layers=[0], dispatch="compact", verbose=False) as patch:
        block(x)
    for handle in handles:
        handle.remove()
    block.experts.__dict__.pop("_apply_gate", None)
    counts = patch.recorder.counts()[0]
    assert len(set(counts.tolist())) > 1
    assert sum(rows) == counts.sum() < 8 * 16


def test_compact_refused_for_gpt_oss_with_the_reason():
    model = tiny_model("gpt_oss")
    with pytest.raises(UnsupportedModelError, match="GptOssExperts has .*is_transposed"):
        RoutingPatch(model, variable(4), dispatch="compact", verbose=False)
    assert set(RoutingPatch(model, variable(4), verbose=False).dispatch.values()) == {"native"}


def test_weights_temperature_refused_where_weights_are_sigmoid_scores():
    with pytest.raises(ValueError, match="weights_temperature applies to softmax weights"):
        RoutingPatch(tiny_model("deepseek_v3"), {**variable(4), "weights_temperature": 2.0}, verbose=False)


def test_blocks_not_understood_are_refused_by_name():
    # a block with a part the patch would skip (here: an extra norm on its output)
    model = tiny_model("mixtral")
    find_moe_blocks(model)[1].module.extra_norm = torch.nn.LayerNorm(model.config.hidden_size)
    with pytest.raises(UnsupportedModelError, match=r"model.layers.1.\w+ \(MixtralSparseMoeBlock\): unknown parts "
                                                    r"\['extra_norm'\] would be skipped"):
        find_moe_blocks(model)
    # a router whose convention none of the known ones reproduces
    model = tiny_model("granitemoe")
    router = find_moe_blocks(model)[0].router
    forward = type(router).forward
    router.forward = lambda x: (lambda out: (out[0], out[1] * 0.5, out[2]))(forward(router, x))
    with pytest.raises(UnsupportedModelError, match=r"block_sparse_moe.router \(GraniteMoeTopKRouter\) routes by a convention"):
        RoutingPatch(model, variable(4), verbose=False)


@pytest.mark.skipif(TRANSFORMERS_5, reason="the refusal of 5.x-only families is checked on transformers 4.x")
@pytest.mark.parametrize("family", sorted(FIVE_X_ONLY))
def test_families_of_the_5x_layout_are_refused_on_4x(family):
    """On 4.x these families' blocks have another layout: patching refuses them, it never routes natively
    in silence."""
    import transformers
    config = family_config(family)  # skipped where this version lacks the family
    model = getattr(transformers, FAMILIES[family][1])(config).eval()
    with pytest.raises(UnsupportedModelError, match="does not understand|no supported MoE block|not supported"):
        RoutingPatch(model, {"strategy": "topk", "k": 2}, verbose=False)
