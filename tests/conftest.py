"""Shared tiny random MoE models (seconds on a CPU) for any test that needs one.

    from conftest import tiny_model            # or use the `tiny_olmoe` fixture
    model = tiny_model("olmoe")                # 2 layers, hidden 64, 64 experts, top-8, eval mode

Families: olmoe, mixtral, qwen2_moe, qwen3_moe. A family the installed transformers lacks (e.g.
Qwen3-MoE before 4.51) is skipped, not failed. ``experts_implementation`` (5.x only: "eager",
"grouped_mm", "batched_mm") is skipped on 4.x.
"""
from __future__ import annotations

from importlib.metadata import version

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
}

TRANSFORMERS_5 = int(version("transformers").split(".")[0]) >= 5  # no import: keeps collection fast


def tiny_config(family: str = "olmoe", **overrides):
    import transformers
    config_class, _, extra = FAMILIES[family]
    if not hasattr(transformers, config_class):
        pytest.skip(f"transformers {transformers.__version__} has no {config_class}")
    return getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})


def tiny_model(family: str = "olmoe", seed: int = 0, experts_implementation: str | None = None, **overrides):
    """A seeded random ``*ForCausalLM`` in eval mode, float32."""
    import transformers
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(config).eval()
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
