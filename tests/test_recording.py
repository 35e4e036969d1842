"""RoutingRecorder and collect_router_logits on tiny random OLMoE models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_inputs, tiny_model
from bh_routing.patching import RoutingPatch, collect_router_logits, find_moe_blocks
from bh_routing.pvalues import Calibration
from bh_routing.recording import RoutingRecorder
from bh_routing.selection import build_router

VARIABLE = {"strategy": "ratio", "beta": 0.7, "max_k": 8}


def test_padding_is_excluded_and_tokens_are_identified(tiny_olmoe):
    input_ids, mask = tiny_inputs(batch=2, length=7, left_pad=3)
    with torch.no_grad(), RoutingPatch(tiny_olmoe, VARIABLE, verbose=False) as patch:
        tiny_olmoe(input_ids, attention_mask=mask)
    recorder = patch.recorder
    tokens = recorder.tokens()
    assert len(tokens) == recorder.num_tokens == int(mask.sum()) == 11
    assert recorder.counts().shape == (2, 11) and recorder.layers == [0, 1]
    assert (tokens.phase == "prefill").all() and (tokens.step == 0).all()
    rows, cols = mask.nonzero(as_tuple=True)
    np.testing.assert_array_equal(tokens.batch, rows.numpy())
    np.testing.assert_array_equal(tokens.position, cols.numpy())
    np.testing.assert_array_equal(tokens.token_id, input_ids[rows, cols].numpy())


def test_to_frame_is_a_tidy_long_table(tiny_olmoe):
    input_ids, mask = tiny_inputs(left_pad=2)
    with torch.no_grad(), RoutingPatch(tiny_olmoe, VARIABLE, verbose=False) as patch:
        tiny_olmoe(input_ids, attention_mask=mask)
    frame = patch.recorder.to_frame()
    assert list(frame.columns) == ["step", "phase", "batch", "position", "token_id", "layer", "count",
                                   "max_prob", "entropy", "experts", "weights"]
    assert len(frame) == 2 * int(mask.sum())
    assert (frame.experts.map(len) == frame["count"]).all() and (frame.weights.map(len) == frame["count"]).all()
    assert frame.experts.map(lambda e: len(set(e)) == len(e) and all(0 <= i < 64 for i in e)).all()
    assert ((frame.max_prob > 0) & (frame.max_prob <= 1)).all()
    assert ((frame.entropy > 0) & (frame.entropy <= np.log(64) + 1e-5)).all()
    # weights are the raw softmax probabilities (OLMoE's convention), in decreasing order
    assert frame.weights.map(lambda w: w == sorted(w, reverse=True) and w[0] <= 1).all()
    np.testing.assert_allclose(frame.weights.map(lambda w: w[0]), frame.max_prob, rtol=1e-6)
    arrays = patch.recorder.arrays()
    assert arrays["experts"].shape == (2, int(mask.sum()), 8) and arrays["experts"].dtype == np.int16
    padded = np.arange(8)[None, None, :] >= arrays["count"][..., None]
    assert (arrays["experts"][padded] == -1).all() and (arrays["weights"][padded] == 0).all()


def test_generate_records_prefill_and_decode_steps(tiny_olmoe):
    input_ids, mask = tiny_inputs(batch=2, length=6, left_pad=2)
    new = 4
    with torch.no_grad(), RoutingPatch(tiny_olmoe, VARIABLE, verbose=False) as patch:
        out = tiny_olmoe.generate(input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0)
    tokens = patch.recorder.tokens()
    prefill, decode = tokens[tokens.phase == "prefill"], tokens[tokens.phase == "decode"]
    assert len(prefill) == int(mask.sum())  # the prompt, padding excluded
    assert len(decode) == 2 * (new - 1)  # the last new token is never fed back
    assert sorted(decode.step.unique()) == list(range(1, new))
    np.testing.assert_array_equal(decode[decode.batch == 0].position, np.arange(6, 6 + new - 1))
    np.testing.assert_array_equal(decode[decode.batch == 1].token_id, out[1, 6:6 + new - 1].numpy())
    assert patch.recorder.counts().shape == (2, len(tokens))


def test_analyze_recording_matches_collected_logits():
    model = tiny_model("olmoe")
    input_ids, mask = tiny_inputs(left_pad=3)
    config = {"strategy": "bh", "alpha": 0.5, "pvalues": "zscore", "max_k": 8}
    with torch.no_grad(), RoutingPatch(model, config, mode="analyze", verbose=False) as patch:
        model(input_ids, attention_mask=mask)
    collected = collect_router_logits(model, [{"input_ids": input_ids, "attention_mask": mask}])
    assert [tuple(t.shape) for t in collected] == [(int(mask.sum()), 64)] * 2
    for layer, router_logits in enumerate(collected):
        expected = build_router(config)(router_logits, layer=layer)
        np.testing.assert_array_equal(patch.recorder.counts()[layer], expected.counts.numpy())


def test_collect_router_logits_equals_output_router_logits_without_padding(tiny_olmoe):
    input_ids, mask = tiny_inputs(left_pad=2)
    with torch.no_grad():
        native = tiny_olmoe(input_ids, attention_mask=mask, output_router_logits=True).router_logits
        unmasked = tiny_olmoe(input_ids, output_router_logits=True).router_logits  # no mask: all tokens real
    keep = mask.bool().reshape(-1)
    collected = collect_router_logits(tiny_olmoe, [{"input_ids": input_ids, "attention_mask": mask}, input_ids])
    for layer in range(2):
        reference = native[layer].reshape(-1, 64)
        if reference.min() >= 0:  # transformers 5.0–5.4 report probabilities here
            pytest.skip("this transformers' output_router_logits holds probabilities, not logits")
        assert torch.equal(collected[layer], torch.cat([reference[keep], unmasked[layer].reshape(-1, 64)]))
    assert collect_router_logits(tiny_olmoe, [input_ids] * 3, max_tokens=10)[0].shape == (10, 64)


def test_raw_router_logits_on_request_and_calibration_round_trip(tiny_olmoe):
    input_ids, mask = tiny_inputs(left_pad=1)
    calibration = Calibration.from_router_logits(
        collect_router_logits(tiny_olmoe, [tiny_inputs(batch=8, length=16, seed=s)[0] for s in range(4)]), top_k=8)
    recorder = RoutingRecorder(router_logits=True)
    config = {"strategy": "bh", "alpha": 0.5, "pvalues": "empirical", "max_k": 8}
    with torch.no_grad(), RoutingPatch(tiny_olmoe, config, calibration=calibration, record=recorder,
                                       verbose=False) as patch:
        tiny_olmoe(input_ids, attention_mask=mask)
    assert patch.recorder is recorder
    raw = recorder.arrays()["router_logits"]
    assert raw.shape == (2, int(mask.sum()), 64) and raw.dtype == np.float32
    routing = build_router(config, calibration)(torch.from_numpy(raw[1]), layer=1)
    np.testing.assert_array_equal(recorder.counts()[1], routing.counts.numpy())


def test_recording_is_streamed_to_cpu_and_clearable(tiny_olmoe):
    input_ids, mask = tiny_inputs()
    with torch.no_grad(), RoutingPatch(tiny_olmoe, VARIABLE, verbose=False) as patch:
        tiny_olmoe(input_ids, attention_mask=mask)
        step = patch.recorder._steps[0]
        assert not step.pending and all(isinstance(v, np.ndarray) for f in step.layers.values() for v in f.values())
        tiny_olmoe(input_ids, attention_mask=mask)
    assert patch.recorder.tokens().step.unique().tolist() == [0, 1]
    patch.recorder.clear()
    assert patch.recorder.num_tokens == 0 and patch.recorder.counts().shape == (0, 0)
    assert len(patch.recorder.to_frame()) == 0


def test_blocks_called_by_hand_are_recorded_as_one_sequence(tiny_olmoe):
    block = find_moe_blocks(tiny_olmoe)[0].module
    with torch.no_grad(), RoutingPatch(tiny_olmoe, VARIABLE, layers=[0], verbose=False) as patch:
        block(torch.randn(1, 5, 64))
        block(torch.randn(2, 3, 64))
    tokens = patch.recorder.tokens()
    assert tokens.step.tolist() == [0] * 5 + [1] * 6 and (tokens.batch == 0).all()
    assert patch.recorder.counts().shape == (1, 11)


def test_record_false_keeps_no_recorder(tiny_olmoe):
    with RoutingPatch(tiny_olmoe, VARIABLE, record=False, verbose=False) as patch:
        tiny_olmoe(tiny_inputs()[0])
    with pytest.raises(AttributeError, match="record=False"):
        patch.recorder.counts()


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_static_cache_generate_records_as_the_dynamic_cache_does(family):
    """A static cache passes 4-D masks (a dict of them in 5.x) and no 2-D padding mask; padding,
    positions and phases must still come out as with the dynamic cache."""
    model = tiny_model(family)
    input_ids, mask = tiny_inputs(batch=2, length=6, left_pad=2)
    new = 4
    try:  # some transformers versions cannot do this for some families, patched or not
        with torch.no_grad():
            model.generate(input_ids, attention_mask=mask, max_new_tokens=1, pad_token_id=0, cache_implementation="static")
    except (TypeError, ValueError) as error:
        pytest.skip(f"this transformers has no static-cache generate for {family}: {error}"[:200])
    runs = []
    for cache in (None, "static"):  # None: the default dynamic cache
        with torch.no_grad(), RoutingPatch(model, VARIABLE, verbose=False) as patch:
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0, cache_implementation=cache)
        runs.append((out, patch.recorder))
    (dynamic_out, dynamic), (static_out, static) = runs
    assert torch.equal(static_out, dynamic_out)
    tokens = static.tokens()
    assert tokens.equals(dynamic.tokens())
    np.testing.assert_array_equal(static.counts(), dynamic.counts())
    prefill, decode = tokens[tokens.phase == "prefill"], tokens[tokens.phase == "decode"]
    rows, cols = mask.nonzero(as_tuple=True)  # the real prompt tokens
    np.testing.assert_array_equal(prefill.batch, rows.numpy())
    np.testing.assert_array_equal(prefill.position, cols.numpy())
    assert len(decode) == 2 * (new - 1)
    np.testing.assert_array_equal(decode[decode.batch == 0].position, np.arange(6, 6 + new - 1))
