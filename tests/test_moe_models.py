"""Tiny MoE models (2 blocks, hidden 32, 4 experts, top-2) built from transformers configs."""

from __future__ import annotations

import torch

VOCAB = 96
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def _build(arch: str) -> torch.nn.Module:
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2)
    if arch == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=32, num_local_experts=4, **common))
    if arch == "qwen2_moe":  # with a shared expert and its sigmoid gate (an nn.Linear that must stay dense)
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=16,
                                                        shared_expert_intermediate_size=32, num_experts=4, **common))
    if arch == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, head_dim=8,
                                                        num_experts=4, **common))
    if arch == "olmoe":
        return tf.OlmoeForCausalLM(tf.OlmoeConfig(intermediate_size=16, num_experts=4, eos_token_id=0, pad_token_id=1,
                                                  **common))
    if arch == "deepseek_v3":  # DeepSeek-style: first block dense, then routed experts + one shared expert
        return tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
            intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **{**common, "num_key_value_heads": 4}))
    raise ValueError(arch)


def tiny_moe(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = _build(arch).eval()
    with torch.no_grad():  # HF leaves some routers at zero (uniform routing): give every router real preferences
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and p.ndim == 2:
                p.normal_(0, 0.5)
    return model
