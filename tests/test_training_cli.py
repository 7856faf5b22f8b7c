"""`sparsecraft finetune` on a tiny local checkpoint: masks unchanged, pruned weights exactly zero on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparsecraft.checkpoint import load_masks, save_masks
from sparsecraft.cli import main
from sparsecraft.patterns import topk_mask

torch.set_num_threads(1)

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n") * 3


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """A 2-block Llama with a character tokenizer; returns 50% magnitude masks (already applied, saved)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{ch: i + 2 for i, ch in enumerate(sorted(set(TEXT)))}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="<s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(folder / "dense")
    tok.save_pretrained(folder / "dense")
    masks = {}
    for fqn, module in model.named_modules():
        if fqn.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            masks[fqn] = topk_mask(module.weight.abs(), 0.5)
            module.weight.data.masked_fill_(~masks[fqn], 0.0)
    model.save_pretrained(folder / "pruned")
    tok.save_pretrained(folder / "pruned")
    save_masks(masks, folder / "pruned" / "masks.safetensors")
    (folder / "pruned" / "settings.json").write_text(json.dumps({"model": str(folder / "dense")}))
    (folder / "text.txt").write_text(TEXT)
    return masks


def test_finetune_command_keeps_masks(tmp_path: Path) -> None:
    masks = _checkpoint(tmp_path)
    assert main(["finetune", str(tmp_path / "pruned"), "--calib", str(tmp_path / "text.txt"),
                 "--eval", str(tmp_path / "text.txt"), "--steps", "4", "--batch-size", "2",
                 "--train-seqlen", "16", "--eval-windows", "2", "--seqlen", "16", "--lr", "1e-2",
                 "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert summary["teacher"] == str(tmp_path / "dense")
    assert summary["pruned_weights"] == sum(int((~m).sum()) for m in masks.values())
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    saved_masks = load_masks(tmp_path / "out" / "masks.safetensors")
    before = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    for fqn, keep in masks.items():
        assert torch.equal(saved_masks[fqn], keep)
        w = weights[f"{fqn}.weight"]
        assert torch.count_nonzero(w[~keep]) == 0
        assert not torch.equal(w, before[f"{fqn}.weight"])  # it did train
    assert not any(k.endswith("weight_keep") for k in weights)  # a plain HF checkpoint
