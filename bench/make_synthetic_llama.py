"""A synthetic LLaMA-7B-shaped bf16 checkpoint (13.1 GiB, 32 blocks of 4096 x 11008), written one block at a time so
it is never whole in memory: the input for measuring streamed pruning at scale.

    python bench/make_synthetic_llama.py /tmp/synth7b runs/demo 32     # runs/demo: any folder with tokenizer files
    /usr/bin/time -v sparsecraft prune --model /tmp/synth7b --method wanda --sparsity 0.5 --nsamples 2 --seqlen 64 \
        --eval-windows 0 --no-speed --output /tmp/synth7b-out

Measured (2 cores, 24 GiB RAM): the streamed prune takes 11 min 39 s and peaks at 2.96 GiB RSS, 22.6% of the
13.1 GiB checkpoint. The output has the 13.1 GiB dense folder, 7.5 GiB packed and 0.8 GB of masks. The vocabulary
(49152) matches SmolLM2's tokenizer.
"""
import json, sys, shutil
from pathlib import Path
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
tok_src = Path(sys.argv[2])
layers = int(sys.argv[3]) if len(sys.argv) > 3 else 32
cfg = LlamaConfig(vocab_size=49152, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
cfg.save_pretrained(out)
g = torch.Generator().manual_seed(0)
def rnd(*shape):
    return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
weight_map, total = {}, 0
def write(name, tensors):
    global total
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    for k, v in tensors.items():
        weight_map[k] = name
        total += v.numel() * v.element_size()
n = layers + 1
write(f"model-00000-of-{n:05d}.safetensors", {"model.embed_tokens.weight": rnd(49152, 4096),
                                              "model.norm.weight": torch.ones(4096, dtype=torch.bfloat16),
                                              "lm_head.weight": rnd(49152, 4096)})
H, F = 4096, 11008
for i in range(layers):
    p = f"model.layers.{i}."
    write(f"model-{i + 1:05d}-of-{n:05d}.safetensors", {
        p + "self_attn.q_proj.weight": rnd(H, H), p + "self_attn.k_proj.weight": rnd(H, H),
        p + "self_attn.v_proj.weight": rnd(H, H), p + "self_attn.o_proj.weight": rnd(H, H),
        p + "mlp.gate_proj.weight": rnd(F, H), p + "mlp.up_proj.weight": rnd(F, H), p + "mlp.down_proj.weight": rnd(H, F),
        p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16)})
    print("block", i, flush=True)
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tok_src / f, out / f)
print("bytes", total)
