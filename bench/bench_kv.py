"""KV-cache presses and block-sparse prefill on SmolLM2-135M, every ratio against the full cache in the same run.

    python bench/bench_kv.py --contexts 2048 --budgets 0.1,0.25,0.5 --samples 1 --needles 2 --decode-steps 8

Per context: long-text perplexity (``--chunk`` held-out tokens scored after the context, at ``--samples`` offsets of
the default corpus' held-out works), needle retrieval (``--needles`` prompts, needle depth 10-90%), cache bytes after
the prompt + ``--decode-steps`` greedy steps and decode tokens/s, for the full cache and each method x budget. Each
prompt's prefill runs once and every press compresses a copy of it (sparsecraft.attention.evaluate.cache_after; a
test shows it equals pressing inside the model). Then, at the longest context: prefill seconds of block-sparse vs
dense attention and the perplexity of the chunk after a block-sparse prefill.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext

import torch
from transformers.cache_utils import DynamicCache

from sparsecraft import data
from sparsecraft.attention import KVConfig, block_sparse, compress
from sparsecraft.attention.evaluate import Prefill, cache_after, cache_bytes, needle_prompts, prefill
from sparsecraft.models import load_model


@torch.no_grad()
def chunk_nll(model, pre: Prefill, cont: torch.Tensor, kv) -> float:
    """Summed NLL of ``cont`` after the prefilled prompt (first token from the prompt's last logits)."""
    rest = model(cont[None, :-1], cache=cache_after(model, pre, kv), use_cache=True).logits[0]
    logp = torch.log_softmax(torch.cat([pre.logits, rest]).float(), dim=-1)
    return float(-logp.gather(1, cont[:, None]).sum())


@torch.no_grad()
def greedy(model, pre: Prefill, kv, steps: int) -> tuple[list[int], float, int]:
    """``steps`` greedy tokens after the prompt -> (tokens, decode tokens/s over steps-1 timed steps, cache bytes)."""
    cache = cache_after(model, pre, kv)
    tok = pre.logits.argmax(-1, keepdim=True)  # (1, 1)
    out = [int(tok)]
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        tok = model(tok, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(tok))
    return out, (steps - 1) / (time.perf_counter() - t0), cache_bytes(cache)


def evaluate(model, tok, ppl_runs, needle_runs, cfg: KVConfig | None, decode_steps: int) -> dict:
    with (compress(model, **cfg.to_dict()) if cfg else nullcontext()) as kv:
        nll = sum(chunk_nll(model, pre, cont, kv) for _, pre, cont in ppl_runs)
        hits = sum(answer in tok.decode(greedy(model, pre, kv, 6)[0]) for pre, answer in needle_runs)
        _, speed, nbytes = greedy(model, ppl_runs[0][1], kv, decode_steps + 1)
    n_tokens = sum(c.numel() for _, _, c in ppl_runs)
    return {"method": cfg.method if cfg else "full", "budget": cfg.budget if cfg else 1.0,
            "perplexity": math.exp(nll / n_tokens), "needle": hits / max(1, len(needle_runs)),
            "cache_bytes": nbytes, "decode_tok_s": speed}


def show(row: dict, full: dict) -> str:
    ppl, mib, speed = row["perplexity"], row["cache_bytes"] / 2 ** 20, row["decode_tok_s"]
    return (f"{row['method']:>9} {row['budget']:>6.2f} {ppl:>10.3f} {ppl / full['perplexity']:>8.4f} "
            f"{row['needle']:>6.2f} {mib:>9.2f} {row['cache_bytes'] / full['cache_bytes']:>7.3f} "
            f"{speed:>8.2f} {speed / full['decode_tok_s']:>7.2f}")


@torch.no_grad()
def block_sparse_prefill(model, ppl_runs, dense_seconds: float, dense_ppl: float, block: int, density: float) -> dict:
    nll, seconds = 0.0, []
    with block_sparse(model, block=block, density=density, min_tokens=1024):
        for ids, _, cont in ppl_runs:
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            first = model(ids[None], cache=cache, use_cache=True).logits[0, -1:]  # block-sparse: no mask, long
            seconds.append(time.perf_counter() - t0)
            rest = model(cont[None, :-1], cache=cache, use_cache=True).logits[0]  # dense: the mask is not None
            logp = torch.log_softmax(torch.cat([first, rest]).float(), dim=-1)
            nll += float(-logp.gather(1, cont[:, None]).sum())
    ppl = math.exp(nll / sum(c.numel() for _, _, c in ppl_runs))
    s = sum(seconds) / len(seconds)
    return {"block": block, "density": density, "dense_prefill_s": dense_seconds, "sparse_prefill_s": s,
            "speedup": dense_seconds / s, "dense_perplexity": dense_ppl, "sparse_perplexity": ppl,
            "perplexity_ratio": ppl / dense_ppl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="2048", help="comma-separated prompt lengths")
    ap.add_argument("--methods", default="streaming,h2o,snapkv,merge")
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--samples", type=int, default=1, help="perplexity offsets per context")
    ap.add_argument("--chunk", type=int, default=128, help="tokens scored after the context")
    ap.add_argument("--needles", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--block", type=int, default=64, help="block-sparse prefill: tokens per block")
    ap.add_argument("--block-density", type=float, default=0.1, help="block-sparse prefill: key blocks kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tok = load_model("default")
    tokens = data.tokenize(tok, data.read_text("shakespeare", "eval"))
    budgets = [float(b) for b in args.budgets.split(",")]
    results: dict = {"rows": [], "block_sparse": None, "settings": vars(args)}
    contexts = [int(c) for c in args.contexts.split(",")]
    for ctx in contexts:
        starts = torch.linspace(0, tokens.numel() - ctx - args.chunk, args.samples).long().tolist()
        ppl_runs = []
        for s in starts:
            ids = tokens[s:s + ctx]
            ppl_runs.append((ids, prefill(model, ids), tokens[s + ctx:s + ctx + args.chunk]))
        needle_runs = [(prefill(model, ids), answer) for ids, answer in needle_prompts(tok, tokens, ctx, args.needles)]
        dense_prefill_s = sum(p.seconds for _, p, _ in ppl_runs) / len(ppl_runs)
        print(f"\ncontext {ctx}: dense prefill {dense_prefill_s:.2f} s; {args.samples} x {args.chunk} scored tokens, "
              f"{args.needles} needles, {args.decode_steps} decode steps")
        print(f"{'method':>9} {'budget':>6} {'ppl':>10} {'ppl/full':>8} {'needle':>6} {'cache MiB':>9} "
              f"{'/full':>7} {'tok/s':>8} {'/full':>7}")
        full = evaluate(model, tok, ppl_runs, needle_runs, None, args.decode_steps)
        print(show(full, full), flush=True)
        results["rows"].append({"context": ctx, **full})
        for method in args.methods.split(","):
            for b in budgets:
                row = evaluate(model, tok, ppl_runs, needle_runs, KVConfig(method=method, budget=b),
                               args.decode_steps)
                print(show(row, full), flush=True)
                results["rows"].append({"context": ctx, **row})
        if ctx == max(contexts):
            bs = block_sparse_prefill(model, ppl_runs, dense_prefill_s, full["perplexity"], args.block,
                                      args.block_density)
            results["block_sparse"] = {"context": ctx, **bs}
            print(f"\nblock-sparse prefill at {ctx} (block {bs['block']}, density {bs['density']}): "
                  f"{bs['sparse_prefill_s']:.2f} s vs dense {bs['dense_prefill_s']:.2f} s = {bs['speedup']:.2f}x; "
                  f"perplexity {bs['sparse_perplexity']:.3f} vs {bs['dense_perplexity']:.3f} "
                  f"(x{bs['perplexity_ratio']:.4f})")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
