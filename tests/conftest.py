"""Tiny models built from transformers configs (2 blocks, small widths) so the real modelling code runs."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, int(os.environ.get("SPARSECRAFT_TEST_THREADS", "2")))))

VOCAB = 96
HIDDEN = 32
FFN = 64


def _configs() -> dict:
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN,
                                                            num_key_value_heads=2, **common)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4,
                                                         bos_token_id=0, eos_token_id=0)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=FFN, word_embed_proj_dim=HIDDEN,
                                                      bos_token_id=0, eos_token_id=0, pad_token_id=1, **common)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=FFN,
                                                                   bos_token_id=0, eos_token_id=0, **common)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=HIDDEN, intermediate_size=FFN,
                                                            num_key_value_heads=2, **common)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(hidden_size=HIDDEN, intermediate_size=FFN, head_dim=8,
                                                            num_key_value_heads=2, **common)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(hidden_size=HIDDEN, intermediate_size=FFN,
                                                                  num_key_value_heads=2, **common)),
        "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(hidden_size=HIDDEN, intermediate_size=FFN, **common)),
    }


ARCHS = ["llama", "gpt2", "opt", "gpt_neox", "qwen2", "gemma", "mistral", "phi"]


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = _configs()[arch]()
    return model.eval()


@pytest.fixture
def calib() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, VOCAB, (4, 16), generator=g)  # (nsamples, seqlen)
