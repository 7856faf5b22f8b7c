"""A tiny local Hugging Face checkpoint (model + character tokenizer) and a small text, for CLI tests."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
        "considered as the rightful property of some one or other of their daughters.\n")


def char_tokenizer(text: str):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1}
    for ch in sorted(set(text)):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<s>")


def make_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Save a 2-block LLaMA (hidden 32) with a character tokenizer to ``folder``; returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer(TEXT)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=1, pad_token_id=0)
    assert len(tok) <= cfg.vocab_size
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_text(path: Path, repeats: int = 6) -> Path:
    path.write_text(TEXT * repeats)
    return path
