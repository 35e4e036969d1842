"""Llama-4 specifics (the parametrised family tests cover native equivalence, generate, restore,
brute force and compact rows): dense/MoE interleave, the sigmoid weights under adaptive strategies,
and BH on empirical p-values calibrated on its selection scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from bh_routing.patching import RoutingPatch, collect_router_logits, find_moe_blocks
from bh_routing.pvalues import Calibration


def native_router_logits(model, input_ids) -> torch.Tensor:
    """The first MoE block's router logits [T, E] from the router's own call on an unpatched forward
    (its second output; transformers 4.57's Llama-4 has no output_router_logits)."""
    captured = []
    handle = find_moe_blocks(model)[0].router.register_forward_hook(lambda m, args, out: captured.append(out[1]))
    with torch.no_grad():
        model(input_ids)
    handle.remove()
    return captured[0]


def token_batches(count: int, seed: int, batch: int = 8, length: int = 32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (batch, length), generator=generator) for _ in range(count)]


def test_interleaved_dense_layers_are_left_alone_and_moe_layers_route_exactly():
    model = tiny_model("llama4", num_hidden_layers=4, interleave_moe_layer_step=2)
    assert [(b.layer, b.name) for b in find_moe_blocks(model)] == [(0, "model.layers.1.feed_forward"),
                                                                  (1, "model.layers.3.feed_forward")]
    input_ids = token_batches(1, seed=0, batch=2, length=9)[0]
    with torch.no_grad():
        reference = model(input_ids).logits
        with RoutingPatch(model, {"strategy": "topk", "k": 1}, verbose=False) as patch:
            assert torch.equal(model(input_ids).logits, reference)
        assert patch.recorder.counts().shape == (2, input_ids.numel())
        with RoutingPatch(model, {"strategy": "ratio", "beta": 0.7, "max_k": 3}, verbose=False) as patch:
            varied = model(input_ids).logits
    assert len(np.unique(patch.recorder.counts())) > 1 and not torch.equal(varied, reference)


@pytest.mark.parametrize("config, weights", [
    ({"strategy": "ratio", "beta": 0.7, "max_k": 3}, lambda chosen: torch.sigmoid(chosen)),
    ({"strategy": "ratio", "beta": 0.7, "max_k": 3, "renormalize": True},
     lambda chosen: torch.sigmoid(chosen) / torch.sigmoid(chosen).sum()),
    ({"strategy": "topk_uniform", "k": 2}, lambda chosen: torch.full_like(chosen, 1 / len(chosen))),
])
def test_adaptive_strategies_mix_with_the_sigmoid_of_each_chosen_logit(config, weights):
    """Each chosen expert weighs sigmoid(its logit), independent of how many are chosen (the model's
    convention at k = 1); renormalize=True and topk_uniform change that on request."""
    model = tiny_model("llama4")
    input_ids = token_batches(1, seed=1, batch=2, length=9)[0]
    router_logits = native_router_logits(model, input_ids)  # [T, E]
    with torch.no_grad(), RoutingPatch(model, config, verbose=False) as patch:
        model(input_ids)
    arrays = patch.recorder.arrays()
    counts = arrays["count"][0]
    for t in range(router_logits.shape[0]):
        chosen = torch.as_tensor(arrays["experts"][0, t][:counts[t]]).long()
        expected = weights(router_logits[t, chosen])
        np.testing.assert_allclose(arrays["weights"][0, t][:counts[t]], expected.numpy(), rtol=1e-6)


def test_weights_temperature_is_refused_for_sigmoid_weights():
    with pytest.raises(ValueError, match="weights_temperature applies to softmax weights"):
        RoutingPatch(tiny_model("llama4"), {"strategy": "ratio", "beta": 0.7, "weights_temperature": 2.0},
                     verbose=False)


def test_bh_on_empirical_pvalues_calibrated_on_the_router_logits():
    """Calibration reads the native router logits (what Llama-4 ranks); held-out p-values of the
    experts a token is not routed to are uniform; the patch's BH count per token is statsmodels' BH
    on those p-values, computed by hand from the calibration's null."""
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    model = tiny_model("llama4")
    calibration_batches, held_out = token_batches(8, seed=2), token_batches(4, seed=3)
    collected = collect_router_logits(model, calibration_batches)
    native = native_router_logits(model, calibration_batches[0])
    assert torch.equal(collected[0][:native.shape[0]], native)  # the router's own logits
    calibration = Calibration.from_router_logits(collected, top_k=find_moe_blocks(model)[0].top_k)

    # held-out: P(p <= q) of non-routed experts against q (each expert's null: its logits where it was not top-1)
    held_logits = torch.cat(collect_router_logits(model, held_out)[:1])  # layer 0, [T, E]
    null, counts = calibration.empirical[0], calibration.empirical_counts[0]  # [E, M], [E]
    pvalues = torch.stack([(1 + (null[e, :counts[e], None] >= held_logits[:, e]).sum(0)) / (counts[e] + 1)
                           for e in range(null.shape[0])], dim=1)  # [T, E]
    not_routed = torch.ones_like(pvalues, dtype=torch.bool).scatter_(1, held_logits.argmax(1, keepdim=True), False)
    for q in (0.05, 0.1, 0.2):
        assert abs(float((pvalues[not_routed] <= q).float().mean()) - q) < 0.35 * q

    config = {"strategy": "bh", "alpha": 0.2, "pvalues": "empirical", "min_k": 1, "max_k": 8}
    with torch.no_grad(), RoutingPatch(model, config, calibration=calibration, layers=[0], verbose=False) as patch:
        for batch in held_out:
            model(batch)
    rejected = np.array([multitest.multipletests(row.double().numpy(), alpha=0.2, method="fdr_bh")[0].sum()
                         for row in pvalues])
    np.testing.assert_array_equal(patch.recorder.counts()[0], np.clip(rejected, 1, 8))
    assert len(np.unique(rejected)) > 1
