"""A synthetic LLaMA-7B-shaped bf16 checkpoint (13.1 GiB, 32 blocks of 4096 x 11008), written one block at a time so
it is never whole in memory: the input for measuring streamed pruning at scale.

    python bench/make_synthetic_llama.py /tmp/synth7b [--layers 32]
    /usr/bin/time -v sparsecraft prune --model /tmp/synth7b --method wanda --sparsity 0.5 --nsamples 2 --seqlen 64 \
        --eval-windows 0 --no-speed --output /tmp/synth7b-out
    python bench/check_pruned.py /tmp/synth7b-out --sparsity 0.5 --load

The tokenizer is SmolLM2's (the embedded default model's; the vocabulary, 49152, matches it). Measured (2 cores,
24 GiB RAM): the streamed prune takes 11 min 39 s and peaks at 2.96 GiB RSS, 22.6% of the 13.1 GiB checkpoint. The
output has the 13.1 GiB dense folder, 7.5 GiB packed and 0.8 GB of masks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

VOCAB, HIDDEN, FFN = 49152, 4096, 11008


def block_tensors(i: int, rnd) -> dict[str, torch.Tensor]:
    p, h, f = f"model.layers.{i}.", HIDDEN, FFN
    ones = torch.ones(h, dtype=torch.bfloat16)
    return {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(h, h),
            p + "self_attn.v_proj.weight": rnd(h, h), p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
            p + "mlp.down_proj.weight": rnd(h, f),
            p + "input_layernorm.weight": ones, p + "post_attention_layernorm.weight": ones.clone()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    a = ap.parse_args()
    out = a.output
    out.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=a.layers,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                tie_word_embeddings=False, dtype="bfloat16").save_pretrained(out)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    total = 0
    n = a.layers + 1

    def write(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()

    write(f"model-00000-of-{n:05d}.safetensors", {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN),
                                                  "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                                                  "lm_head.weight": rnd(VOCAB, HIDDEN)})
    for i in range(a.layers):
        write(f"model-{i + 1:05d}-of-{n:05d}.safetensors", block_tensors(i, rnd))
        print("block", i, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    from sparsecraft.models import load_model

    _, tokenizer = load_model("default")
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: {total / 2**30:.1f} GiB of weights")


if __name__ == "__main__":
    main()
