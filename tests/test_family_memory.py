"""Every family's total and active parameters from its config alone, against the instantiated model
and the published sizes; the planner refuses what cannot fit; any family loads by path."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from bh_routing.parameters import COUNTED_FAMILIES
from bh_routing.models import (TINY_MODEL_DIR, ModelTooLargeError, count_parameters, load_model,
                               memory_plan, plan_for)
from conftest import FAMILIES, tiny_model

VARIANTS = [(family, {}) for family in FAMILIES] + [
    ("deepseek_v3", dict(first_k_dense_replace=1, q_lora_rank=24, attention_bias=True)),  # a dense first layer
    ("glm4_moe", dict(first_k_dense_replace=1, use_qk_norm=True, attention_bias=True)),
    ("qwen2_moe", dict(mlp_only_layers=[0])),
    ("qwen3_moe", dict(decoder_sparse_step=2)),
    ("olmoe", dict(tie_word_embeddings=True)),
    ("llama4", dict(num_hidden_layers=4, interleave_moe_layer_step=2, attention_bias=True)),  # dense layers 0, 2
    ("llama4", dict(num_experts_per_tok=2, use_qk_norm=False)),
    ("qwen3_next", dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
                        attention_bias=True, mlp_only_layers=[2])),
    ("qwen3_vl_moe", dict(num_hidden_layers=3, mlp_only_layers=[1], attention_bias=True)),
]


def _routed_experts(model, top_k: int) -> list[tuple[int, int, int]]:
    """(parameters, experts, top_k) of each MoE layer's routed experts, read off the model itself."""
    found = []
    for name, module in model.named_modules():
        if name.endswith(".experts") and hasattr(module, "gate_up_proj"):
            experts = module.gate_up_proj.shape[0]
            found.append((sum(p.numel() for p in module.parameters()), experts, top_k))
    return found


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=[f"{f}-{'-'.join(o) or 'default'}" for f, o in VARIANTS])
def test_total_and_active_parameters_from_the_config_match_the_model(family, overrides):
    model = tiny_model(family, **overrides)
    config = model.config.get_text_config()  # the text decoder's (Qwen3-VL-MoE: its vision tower is not counted)
    assert config.model_type in COUNTED_FAMILIES
    total = sum(p.numel() for name, p in model.named_parameters() if ".visual." not in name)
    routed = _routed_experts(model, config.num_experts_per_tok)
    assert routed, "the tiny model has MoE layers"
    # one token uses only top_k of each layer's E routed experts; everything else (shared experts,
    # routers, dense layers, attention, embeddings) it uses in full
    active = total - sum(params * (experts - top_k) // experts for params, experts, top_k in routed)
    assert count_parameters(config) == total
    assert count_parameters(config, active=True) == active


@pytest.mark.parametrize("config,total_b,active_b", [
    (transformers.DeepseekV3Config, 671.0, 37.6),   # published: 671 B total, 37 B active
    (transformers.MixtralConfig, 46.7, 12.9),       # Mixtral-8x7B: 46.7 B, 12.9 B
])
def test_full_size_counts_match_the_published_ones(config, total_b, active_b):
    config = config()
    assert count_parameters(config) / 1e9 == pytest.approx(total_b, abs=0.05)
    assert count_parameters(config, active=True) / 1e9 == pytest.approx(active_b, abs=0.05)


@pytest.mark.parametrize("config_class, overrides, total_b, active_b", [
    ("Llama4TextConfig", {}, None, 17),                                   # Llama-4 Scout: 17 B active (text)
    ("Llama4TextConfig", dict(num_local_experts=128, interleave_moe_layer_step=2), 400, 17),  # Maverick
    ("Qwen3NextConfig", {}, 80, None),                                    # Qwen3-Next-80B-A3B
    ("Qwen3_5MoeTextConfig", {}, 35, None),                               # Qwen3.5-35B-A3B
])
def test_hybrid_and_interleaved_families_match_their_published_sizes(config_class, overrides, total_b, active_b):
    if not hasattr(transformers, config_class):
        pytest.skip(f"transformers {transformers.__version__} has no {config_class}")
    config = getattr(transformers, config_class)(**overrides)
    if total_b is not None:
        assert count_parameters(config) / 1e9 == pytest.approx(total_b, rel=0.02)
    if active_b is not None:
        assert count_parameters(config, active=True) / 1e9 == pytest.approx(active_b, rel=0.02)


def test_a_multimodal_config_is_refused_with_where_its_text_decoder_is():
    config = tiny_model("qwen3_vl_moe").config
    with pytest.raises(ValueError, match=r"Qwen3VLMoeConfig is a multimodal config: .*get_text_config\(\)"):
        count_parameters(config)
    assert count_parameters(config.get_text_config()) > 0


def test_a_model_that_cannot_fit_is_refused_with_the_numbers(tmp_path):
    config = transformers.DeepseekV3Config()  # full size; only its config.json exists: nothing is loaded
    config.save_pretrained(tmp_path)
    plan = plan_for(str(tmp_path), device="cpu", dtype="bf16")
    assert plan.n_params == count_parameters(config) and plan.weight_bytes == 2 * plan.n_params
    assert not plan.fits
    with pytest.raises(ModelTooLargeError, match=r"(?s)671\.03 B parameters \(37\.55 B active per token\).*"
                                                 r"Does NOT fit: the weights alone need.*more than 125\d\.\d GiB free"):
        load_model(str(tmp_path), device="cpu", dtype="bf16", verbose=False)
    fits = memory_plan(config, memory_bytes=2 * plan.n_params + 200 * 2**30, dtype=torch.bfloat16)
    assert fits.fits  # the same model on 1.5 TiB (e.g. 8 x 192 GiB) leaves room to run


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_any_family_loads_by_path_and_calibrates_through_the_cli(family, tmp_path):
    from bh_routing.__main__ import main
    model = tiny_model(family, vocab_size=json.loads((TINY_MODEL_DIR / "config.json").read_text())["vocab_size"])
    model.save_pretrained(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL_DIR / name, tmp_path / "model" / name)
    loaded, _ = load_model(str(tmp_path / "model"), device="cpu", verbose=False)
    assert type(loaded) is type(model)
    out = tmp_path / "calibration.safetensors"
    assert main(["calibrate", "--model", str(tmp_path / "model"), "--device", "cpu", "--out", str(out),
                 "--calibration-tokens", "256"]) == 0
    from bh_routing.pvalues import Calibration
    calibration = Calibration.load(out, model=loaded)
    assert (calibration.num_layers, calibration.num_experts) == (2, model.config.num_experts
                                                                 if family != "deepseek_v3" else model.config.n_routed_experts)
