"""Parameter counts of decoder-only (MoE) models from their config alone — no weights, no model
built — for the memory planner (:mod:`bh_routing.models`).

``count_parameters(config, active=False)`` is exact for the families in ``COUNTED_FAMILIES``
(tested against ``sum(p.numel())`` of instantiated models), a llama-like estimate for others.
``active=True`` counts what one token uses: its top-k routed experts of each MoE layer, and
everything else (shared experts, routers, dense layers, attention, embeddings) in full.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """The sizes that memory depends on, read from any decoder-only HF config."""
    vocab: int
    hidden: int
    intermediate: int     # one routed expert's (a dense model's MLP's)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int          # 1 for a dense model
    top_k: int            # 1 for a dense model
    tied_embeddings: bool
    attention_bias: bool
    max_positions: int | None

    @classmethod
    def of(cls, config) -> "Shape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if text is not config and not hasattr(config, "hidden_size"):
            raise ValueError(f"{type(config).__name__} is a multimodal config: its text decoder's size is "
                             "config.get_text_config() (count_parameters / memory_plan on that); the rest of the "
                             "model (e.g. a vision tower) comes on top")
        heads = config.num_attention_heads
        experts = (getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
                   or getattr(config, "n_routed_experts", None) or 1)
        return cls(
            vocab=config.vocab_size, hidden=config.hidden_size,
            intermediate=getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
            layers=config.num_hidden_layers, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            experts=experts, top_k=getattr(config, "num_experts_per_tok", 1) if experts > 1 else 1,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            max_positions=getattr(config, "max_position_embeddings", None),
        )


# model_type -> per-family details of the closed form (every other model_type: a llama-like estimate)
COUNTED_FAMILIES = ("olmoe", "flex_olmo", "mixtral", "granitemoe", "qwen2_moe", "qwen3_moe", "deepseek_v3",
                    "glm4_moe", "gpt_oss", "llama4_text", "qwen3_next", "qwen3_5_moe_text", "qwen3_vl_moe_text")
# families whose full attention has an output gate: q_proj is twice as wide (Qwen3-Next, Qwen3.5)
GATED_ATTENTION = ("qwen3_next", "qwen3_5_moe_text")


def _attention_parameters(config, s: Shape) -> int:
    """One layer's (full) attention: q/k/v/o projections, their biases and the family's q/k norms."""
    family = getattr(config, "model_type", None)
    if family == "deepseek_v3":  # multi-head latent attention (low-rank q and kv)
        qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        q_rank = getattr(config, "q_lora_rank", None)
        q = (s.hidden * q_rank + q_rank + q_rank * s.heads * qk_dim) if q_rank else s.hidden * s.heads * qk_dim
        kv = (s.hidden * (config.kv_lora_rank + config.qk_rope_head_dim) + config.kv_lora_rank
              + config.kv_lora_rank * s.heads * (config.qk_nope_head_dim + config.v_head_dim))
        # attention_bias: q_a (not q_proj/q_b), kv_a and o projections
        bias = ((q_rank or 0) + config.kv_lora_rank + config.qk_rope_head_dim + s.hidden) if s.attention_bias else 0
        return q + kv + s.heads * config.v_head_dim * s.hidden + bias
    q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
    q_out = 2 * q_dim if family in GATED_ATTENTION else q_dim  # query and its output gate
    weights = s.hidden * (q_out + 2 * kv_dim) + q_dim * s.hidden
    if family == "qwen2_moe" or (family == "glm4_moe" and s.attention_bias):
        weights += q_out + 2 * kv_dim                  # q, k, v biases (o_proj has none)
    elif s.attention_bias:
        weights += q_out + 2 * kv_dim + s.hidden       # q, k, v and o biases
    if family in ("olmoe", "flex_olmo"):
        weights += q_dim + kv_dim                      # q_norm and k_norm over all heads
    elif (family in ("qwen3_moe", "qwen3_vl_moe_text") + GATED_ATTENTION
          or (family == "glm4_moe" and getattr(config, "use_qk_norm", False))):
        weights += 2 * s.head_dim                      # q_norm and k_norm per head
    if family == "gpt_oss":
        weights += s.heads                             # attention sinks
    return weights                                     # (Llama-4's qk_norm has no weight)


def _linear_attention_parameters(config, s: Shape) -> int:
    """One gated DeltaNet layer (Qwen3-Next, Qwen3.5 ``linear_attention``): input projections of
    q, k, v, the output gate z and the per-head b and a; a depthwise causal conv over q, k, v;
    per-head ``dt_bias`` and ``A_log``; a gated RMSNorm over a value head; the output projection."""
    key_dim = config.linear_num_key_heads * config.linear_key_head_dim
    value_dim = config.linear_num_value_heads * config.linear_value_head_dim
    conv_dim = 2 * key_dim + value_dim
    projections = s.hidden * (2 * key_dim + 2 * value_dim + 2 * config.linear_num_value_heads)
    return (projections + conv_dim * config.linear_conv_kernel_dim + 2 * config.linear_num_value_heads
            + config.linear_value_head_dim + value_dim * s.hidden)


def _sparse_layers(config, s: Shape) -> list[bool]:
    """Which layers are MoE (True) and which a dense MLP (False)."""
    if s.experts <= 1:
        return [False] * s.layers
    if getattr(config, "moe_layers", None) is not None:                 # Llama-4 (interleave_moe_layer_step)
        return [i in set(config.moe_layers) for i in range(s.layers)]
    first_dense = getattr(config, "first_k_dense_replace", None) or 0   # DeepSeek-V3, GLM-4-MoE
    only_mlp = set(getattr(config, "mlp_only_layers", None) or ())      # Qwen2/3-MoE
    step = getattr(config, "decoder_sparse_step", None) or 1
    return [i >= first_dense and i not in only_mlp and (i + 1) % step == 0 for i in range(s.layers)]


def _moe_parameters(config, s: Shape, active: bool) -> int:
    """One MoE layer: routed experts (top-k of them when ``active``), router, shared experts."""
    family = getattr(config, "model_type", None)
    expert = 3 * s.hidden * s.intermediate                            # gate, up, down
    if family == "gpt_oss":
        expert += 2 * s.intermediate + s.hidden                       # gate_up and down biases
    router = s.hidden * s.experts + (s.experts if family == "gpt_oss" else 0)
    shared = 0
    if getattr(config, "shared_expert_intermediate_size", None):      # Qwen2-MoE, Qwen3-Next, Qwen3.5: gated
        shared = 3 * s.hidden * config.shared_expert_intermediate_size + s.hidden
    elif getattr(config, "n_shared_experts", None):                   # DeepSeek-V3, GLM-4-MoE
        shared = 3 * s.hidden * s.intermediate * config.n_shared_experts
    elif family == "llama4_text":                                     # one ungated shared expert
        shared = expert
    return (s.top_k if active else s.experts) * expert + router + shared


def count_parameters(config, active: bool = False) -> int:
    """Parameters of a decoder from its config: exact for the families in ``COUNTED_FAMILIES`` (routed
    and shared experts, dense layers such as DeepSeek's ``first_k_dense_replace`` or Llama-4's
    interleave, biases, latent attention, linear attention layers), a llama-like estimate for others.
    ``active=True``: what one token uses (its top-k routed experts; shared experts, router,
    attention and embeddings all count)."""
    s = Shape.of(config)
    full_attention = _attention_parameters(config, s)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * s.layers
    attention = sum(_linear_attention_parameters(config, s) if kind == "linear_attention" else full_attention
                    for kind in layer_types)
    dense_mlp = 3 * s.hidden * (getattr(config, "intermediate_size_mlp", None)  # Llama-4's dense layers
                                or getattr(config, "intermediate_size", None) or 0)  # (Qwen3.5: none)
    mlps = sum(_moe_parameters(config, s, active) if sparse else dense_mlp for sparse in _sparse_layers(config, s))
    norms = 2 * s.hidden * s.layers + s.hidden                        # two per layer and the final one
    embeddings = s.vocab * s.hidden * (1 if s.tied_embeddings else 2)
    return attention + mlps + norms + embeddings
