"""Shared tiny random MoE models (seconds on a CPU) for any test that needs one.

    from conftest import tiny_model            # or use the `tiny_olmoe` fixture
    model = tiny_model("olmoe")                # 2 layers, hidden 64, 64 experts, top-8, eval mode

Families: olmoe, mixtral, qwen2_moe, qwen3_moe (every version); llama4 (4.51 on); deepseek_v3, glm4_moe,
gpt_oss, granitemoe, flex_olmo, qwen3_next, qwen3_5_moe, qwen3_vl_moe (transformers 5.x layout; Qwen3-VL-MoE
as its vision-language model fed text only). A family the installed transformers lacks (e.g.
Qwen3-MoE before 4.51) is skipped, not failed. ``experts_implementation`` (5.x only: "eager",
"grouped_mm", "batched_mm") is skipped on 4.x.
"""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
import torch

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.05, pad_token_id=0, bos_token_id=2, eos_token_id=1,
              tie_word_embeddings=False)

# family -> (config class, causal-LM class, family-specific config)
FAMILIES = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_experts=64, num_experts_per_tok=8, intermediate_size=32)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True)),
    # transformers 5.x families, recognised by interface (skipped where the version lacks them)
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, intermediate_size=48,
                         n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                         first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=16, head_dim=8, num_key_value_heads=4)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, intermediate_size=48,
                      n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5,
                      first_k_dense_replace=0, head_dim=16)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"])),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, norm_topk_prob=False)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                        shared_expert_intermediate_size=48, norm_topk_prob=True, head_dim=16,
                        layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)),
    # Llama-4 (transformers 4.51 on): sigmoid top-1, the weight on the expert's input, an ungated shared expert
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(num_local_experts=8, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=48,
                    head_dim=16)),
    # Qwen3-MoE's block (Qwen3-VL-MoE) and Qwen3-Next's (Qwen3.5-MoE) in newer models
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                    dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, head_dim=16,
                         layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                         linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)),
    "qwen3_vl_moe": ("Qwen3VLMoeTextConfig", "Qwen3VLMoeForConditionalGeneration",  # text-only inputs
                     dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, head_dim=16,
                          rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})),  # Σ = head_dim / 2
}
# Families whose text decoder transformers ships only inside a vision-language model: the tiny model
# is that model with the text config above and this (smallest) vision tower, fed text only
VISION_WRAPPED = {"qwen3_vl_moe": ("Qwen3VLMoeConfig", dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                                           out_hidden_size=64, deepstack_visual_indexes=[0]))}
# Supported on the transformers 5.x layout only (router module + fused experts); on 4.x RoutingPatch
# refuses their blocks by name (tests/test_families.py checks the refusal there)
FIVE_X_ONLY = {"deepseek_v3", "glm4_moe", "gpt_oss", "granitemoe", "flex_olmo", "qwen3_next", "qwen3_5_moe",
               "qwen3_vl_moe"}
# Families whose fused experts the compact dispatch cannot read (GPT-OSS: transposed, interleaved, biased)
COMPACT_UNSUPPORTED = {"gpt_oss"}

TRANSFORMERS_5 = int(version("transformers").split(".")[0]) >= 5  # no import: keeps collection fast

# The bundled tiny trained OLMoE ships with the package; tests that load it say so with this mark.
TINY_WEIGHTS = Path(__file__).resolve().parents[1] / "bh_routing" / "assets" / "tiny-olmoe" / "model.safetensors"
needs_tiny = pytest.mark.skipif(not TINY_WEIGHTS.exists(),
                                reason="the bundled tiny OLMoE (bh_routing/assets/tiny-olmoe) is not in this checkout")


@pytest.fixture
def offline_hub(monkeypatch):
    """No hub access for the test: models and data come from the package and the local cache only
    (use with ``pytestmark = pytest.mark.usefixtures("offline_hub")``)."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")


def tiny_config(family: str = "olmoe", **overrides):
    import transformers
    if family in FIVE_X_ONLY and not TRANSFORMERS_5:
        pytest.skip(f"{family} is supported on the transformers 5.x layout only (have {transformers.__version__}; "
                    "RoutingPatch refuses its 4.x block)")
    return family_config(family, **overrides)


def family_config(family: str, **overrides):
    """The family's tiny config in any transformers version (skipped where the version lacks it)."""
    import transformers
    config_class, _, extra = FAMILIES[family]
    if not hasattr(transformers, config_class):
        pytest.skip(f"transformers {transformers.__version__} has no {config_class}")
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})
    if family in VISION_WRAPPED:
        wrapper_class, vision = VISION_WRAPPED[family]
        config = getattr(transformers, wrapper_class)(text_config=config.to_dict(), vision_config=vision,
                                                      tie_word_embeddings=COMMON["tie_word_embeddings"])
    return config


def tiny_model(family: str = "olmoe", seed: int = 0, experts_implementation: str | None = None, **overrides):
    """A seeded random ``*ForCausalLM`` in eval mode, float32."""
    import transformers
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(config).eval()
    for module in model.modules():  # DeepSeek-V3 style: a non-zero selection bias (zeros at init)
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    if experts_implementation is not None:
        if not hasattr(model, "set_experts_implementation"):
            pytest.skip(f"experts_implementation needs transformers 5.x (have {transformers.__version__})")
        model.set_experts_implementation(experts_implementation)
    return model


def tiny_inputs(batch: int = 2, length: int = 7, vocab: int = 128, seed: int = 1, left_pad: int = 0):
    """input_ids [B, S] (no special ids) and an attention mask, row 0 left-padded by ``left_pad``."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if left_pad:
        input_ids[0, :left_pad] = COMMON["pad_token_id"]
        attention_mask[0, :left_pad] = 0
    return input_ids, attention_mask


@pytest.fixture
def tiny_olmoe():
    return tiny_model("olmoe")


# --------------------------------------------------------------------------- notebook modules


def make_routing_sample(layers=3, tokens=400, experts=16, top_k=4, seed=0, sources=("a", "b")):
    """A RoutingSample of random logits with per-expert base rates, as a trained router has."""
    import numpy as np
    from bh_routing.native_routing import RoutingSample
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(layers, experts, generator=g)  # experts with different base rates, like a trained router
    logits = [torch.randn(tokens, experts, generator=g) * (0.5 + l) + bias[l] for l in range(layers)]
    source = np.array([sources[i % len(sources)] for i in range(tokens)], dtype=object)
    return RoutingSample(logits, np.arange(tokens) % 50, source, np.arange(tokens) // 20, np.arange(tokens) % 20, top_k)




def random_calibration(layers=2, experts=64, tokens=6000, seed=0):
    """(Calibration, its [T, N] logits per layer) of random logits with a per-expert trend."""
    from bh_routing.pvalues import Calibration
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(tokens, experts, generator=g) + torch.linspace(-1, 1, experts) for _ in range(layers)]
    return Calibration.from_router_logits(logits, top_k=8), logits
