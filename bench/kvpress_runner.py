"""NVIDIA kvpress on the prompts bench_kv.py wrote: the peer's presses, same model, texts, budgets and metrics.

Runs inside kvpress's own venv (kvpress pins transformers < 5.3; bench_kv.py --kvpress makes the venv and starts
this script there), so it imports only torch, transformers and kvpress, never sparsecraft.

    python bench/kvpress_runner.py --inputs prompts.pt --out rows.json --presses snapkv,streaming --budgets 0.25

kvpress is used as its README shows, ``with press(model): model(prompt, past_key_values=cache)``: a forward hook on
each attention layer compresses that layer's cache during the prompt pass (which attends over the whole prompt, as
sparsecraft's does); scoring and decoding then run on the compressed cache. Prefill at 8k tokens is slow on two cores,
so each prompt runs once: its full cache and every attention layer's hook arguments (hidden states, position
embeddings, cache position) are recorded, and each press replays its own hook on a copy of the full cache
(``replayed``). ``--check`` first shows that this gives exactly the cache of the ``with press(model)`` path.
``compression_ratio`` is the fraction removed, so a budget b (fraction kept) is ``compression_ratio = 1 - b``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import kvpress

# press name -> (kvpress class, extra arguments)
PRESSES = {
    "streaming": ("StreamingLLMPress", {"n_sink": 4}),
    "snapkv": ("SnapKVPress", {}),
    "knorm": ("KnormPress", {}),
    "tova": ("TOVAPress", {}),
    "expected": ("ExpectedAttentionPress", {}),
}  # ObservedAttentionPress (H2O-like) is left out: it needs eager attention weights (9 x n x n per layer)


def cache_bytes(cache) -> int:
    return sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers if l.keys is not None)


@torch.no_grad()
def with_press(model, ids: torch.Tensor, press) -> tuple[torch.Tensor, DynamicCache]:
    """kvpress's own path: the prompt pass inside ``with press(model)`` -> (last logits (1, V), cache)."""
    cache = DynamicCache()
    with press(model):
        logits = model(ids[None], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1:]
    return logits, cache


@torch.no_grad()
def recorded(model, ids: torch.Tensor) -> tuple[torch.Tensor, DynamicCache, list]:
    """One full-cache prompt pass -> (last logits, full cache, per layer (attention module, hook kwargs, output))."""
    calls = []
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, a, kw, out: calls.append((m, {k: v for k, v in kw.items() if k != "past_key_values"}, out)),
        with_kwargs=True) for layer in model.model.layers]
    cache = DynamicCache()
    try:
        logits = model(ids[None], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1:]
    finally:
        for h in hooks:
            h.remove()
    return logits, cache, calls


def replayed(model, full: DynamicCache, calls: list, press) -> DynamicCache:
    """A copy of ``full`` compressed by ``press``'s own forward hook, called with each layer's recorded arguments,
    as ``with press(model)`` does during the prompt pass (press None: the full cache)."""
    cache = DynamicCache()
    for i, layer in enumerate(full.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), i)
    if press is None:
        return cache
    press.post_init_from_model(model)
    for module, kwargs, out in calls:
        module.rotary_emb = model.model.rotary_emb  # what press(model) sets before hooking
        press.forward_hook(module, [], {**kwargs, "past_key_values": cache}, out)
    return cache


@torch.no_grad()
def greedy(model, logits: torch.Tensor, cache, n: int, steps: int) -> list[int]:
    """``steps`` greedy tokens after an n-token prompt. A pressed cache holds fewer than n slots, so the positions
    are given (n, n + 1, ...), as kvpress's own pipeline does; left to the cache they would start at its length."""
    tok_ = logits.argmax(-1, keepdim=True)  # (1, 1)
    out = [int(tok_)]
    for i in range(steps - 1):
        pos = torch.tensor([[n + i]])
        logits = model(tok_, past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1]
        tok_ = logits.argmax(-1, keepdim=True)
        out.append(int(tok_))
    return out


@torch.no_grad()
def run(model, tok, inputs: dict, settings: list[tuple[str, float, object]], decode_steps: int) -> list[dict]:
    """Every setting (name, budget, press or None) on every prompt, each prompt's pass run once."""
    acc = {(n, b): {"nll": 0.0, "scored": 0, "hits": 0} for n, b, _ in settings}
    for j, (ids, cont) in enumerate(inputs["ppl"]):
        logits, full, calls = recorded(model, ids)
        for n, b, press in settings:
            cache = replayed(model, full, calls, press)
            pos = torch.arange(ids.numel(), ids.numel() + cont.numel() - 1)[None]  # true positions (see greedy)
            rest = model(cont[None, :-1], past_key_values=cache, position_ids=pos, use_cache=True).logits[0]
            logp = torch.log_softmax(torch.cat([logits, rest]).float(), dim=-1)
            acc[n, b]["nll"] += float(-logp.gather(1, cont[:, None]).sum())
            acc[n, b]["scored"] += cont.numel()
            if j == 0:  # decode speed and cache bytes after the first text
                cache = replayed(model, full, calls, press)
                t0 = time.perf_counter()
                greedy(model, logits, cache, ids.numel(), decode_steps + 1)
                acc[n, b]["decode_tok_s"] = decode_steps / (time.perf_counter() - t0)
                acc[n, b]["cache_bytes"] = cache_bytes(cache)
        del full, calls
    for ids, answer in inputs["needles"]:
        logits, full, calls = recorded(model, ids)
        for n, b, press in settings:
            out = greedy(model, logits, replayed(model, full, calls, press), ids.numel(), 6)
            acc[n, b]["hits"] += answer in tok.decode(out)
        del full, calls
    return [{"method": n, "budget": b, "perplexity": math.exp(a["nll"] / a["scored"]),
             "needle": a["hits"] / max(1, len(inputs["needles"])), "cache_bytes": a["cache_bytes"],
             "decode_tok_s": a["decode_tok_s"]} for (n, b), a in acc.items()]


def check(model, ids: torch.Tensor, press) -> float:
    """Largest difference between the replayed cache and kvpress's own ``with press(model)`` cache."""
    _, full, calls = recorded(model, ids)
    mine, (_, theirs) = replayed(model, full, calls, press), with_press(model, ids, press)
    return max(float((a.keys - b.keys).abs().max()) + float((a.values - b.values).abs().max())
               for a, b in zip(mine.layers, theirs.layers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", required=True, help="torch file from bench_kv.py: model dir/file, ppl, needles")
    ap.add_argument("--out", required=True)
    ap.add_argument("--presses", default="streaming,snapkv,knorm,tova,expected")
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", type=int, default=0,
                    help="first compare replayed and with-press caches on this many tokens of the first text")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    inputs = torch.load(args.inputs)
    tok = AutoTokenizer.from_pretrained(inputs["model_dir"], gguf_file=inputs["gguf_file"])
    model = AutoModelForCausalLM.from_pretrained(inputs["model_dir"], gguf_file=inputs["gguf_file"],
                                                 dtype=torch.float32, attn_implementation="sdpa").eval()
    settings = [("kvpress full", 1.0, None)]
    for name in args.presses.split(","):
        cls, extra = PRESSES[name]
        settings += [(f"kvpress {name}", float(b), getattr(kvpress, cls)(compression_ratio=1 - float(b), **extra))
                     for b in args.budgets.split(",")]
    if args.check:
        ids = inputs["ppl"][0][0][:args.check]
        for name, b, press in settings[1:]:
            diff = check(model, ids, press)
            print(f"check {name} {b}: replayed vs with press(model), max |diff| {diff:.3g}", flush=True)
            if diff > 1e-4:
                raise SystemExit(f"{name} {b}: the replayed cache differs from kvpress's own by {diff}")
    rows = run(model, tok, inputs, settings, args.decode_steps)
    with open(args.out, "w") as f:
        json.dump({"rows": rows}, f)


if __name__ == "__main__":
    main()
