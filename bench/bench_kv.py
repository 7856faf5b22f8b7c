"""KV-cache presses and block-sparse prefill on SmolLM2-135M, every ratio against the full cache in the same run.

    python bench/bench_kv.py --contexts 2048,4096,8192 --budgets 0.1,0.25,0.5 --samples 1 --needles 4 --kvpress

Per context: long-text perplexity (``--chunk`` held-out tokens scored after the context, at ``--samples`` offsets of
the default corpus' held-out works), passkey retrieval (``--needles`` prompts, key depth 10-90%), cache bytes after
the prompt + ``--decode-steps`` greedy steps and decode tokens/s, for the full cache and each method x budget. Each
prompt's prefill runs once and every press compresses a copy of it (sparsecraft.attention.evaluate.cache_after; a
test shows it equals pressing inside the model); prompts are taken one at a time (an 8k prefill with its queries
holds about 1 GB).

``--kvpress``: NVIDIA's kvpress on the same prompts, in its own venv (``--kvpress-venv``, made on first use: kvpress
pins transformers < 5.3; never a dependency of sparsecraft), through bench/kvpress_runner.py; its rows join the table.

At each of ``--block-contexts``: prefill seconds of block-sparse vs dense attention for every ``--block-settings``
(block:density), the share of the dense prefill spent in attention, and the perplexity of the chunk after each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from sparsecraft import data
from sparsecraft.attention import KVConfig, block_sparse, compress
from sparsecraft.attention.evaluate import Prefill, cache_after, cache_bytes, needle_prompts, prefill
from sparsecraft.models import load_model, resolve_model

HERE = Path(__file__).resolve().parent


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


def measure(model, tok, ctx: int, ppl_texts, needles, configs: list, decode_steps: int) -> tuple[list, list]:
    """Every config (None = full cache) on every prompt, one prefill per prompt -> (rows, dense prefills' seconds
    and attention seconds of the perplexity texts)."""
    acc = [{"nll": 0.0, "hits": 0} for _ in configs]
    times = []
    for j, (ids, cont) in enumerate(ppl_texts):
        pre = prefill(model, ids)
        times.append((pre.seconds, pre.attention_seconds))
        for a, cfg in zip(acc, configs):
            with (compress(model, **cfg.to_dict()) if cfg else nullcontext()) as kv:
                a["nll"] += chunk_nll(model, pre, cont, kv)
                if j == 0:
                    _, a["decode_tok_s"], a["cache_bytes"] = greedy(model, pre, kv, decode_steps + 1)
        del pre
    for ids, answer in needles:
        pre = prefill(model, ids)
        for a, cfg in zip(acc, configs):
            with (compress(model, **cfg.to_dict()) if cfg else nullcontext()) as kv:
                a["hits"] += answer in tok.decode(greedy(model, pre, kv, 6)[0])
        del pre
    scored = sum(c.numel() for _, c in ppl_texts)
    rows = [{"context": ctx, "method": label(cfg), "budget": cfg.budget if cfg else 1.0,
             "perplexity": math.exp(a["nll"] / scored), "needle": a["hits"] / max(1, len(needles)),
             "cache_bytes": a["cache_bytes"], "decode_tok_s": a["decode_tok_s"]} for a, cfg in zip(acc, configs)]
    return rows, times


def label(cfg: KVConfig | None) -> str:
    """Row name: the method, plus any option that differs from KVConfig's default (e.g. "snapkv w8")."""
    if cfg is None:
        return "full"
    short = {"window": "w", "sinks": "s", "pool": "p"}
    diff = [f"{short[k]}{v}" for k, v in cfg.to_dict().items() if k in short and v != getattr(KVConfig, k)]
    return " ".join([cfg.method] + diff)


def kvpress_venv(venv: Path) -> Path:
    """kvpress's own venv (made once): the local CPU torch wheel pinned first, so nothing pulls a CUDA torch."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making kvpress venv {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["torch==2.13.0", "kvpress==0.5.5", "transformers>=4.56,<5.3", "gguf"], check=True)
    return python


def kvpress_rows(args, ctx: int, ppl_texts, needles) -> list[dict]:
    python = kvpress_venv(Path(args.kvpress_venv))
    where, gguf = resolve_model(None)
    work = Path(args.kvpress_venv).parent
    inputs, out = work / f"kvpress_inputs_{ctx}.pt", work / f"kvpress_rows_{ctx}.json"
    torch.save({"model_dir": where, "gguf_file": gguf, "ppl": ppl_texts, "needles": needles}, inputs)
    cmd = [str(python), str(HERE / "kvpress_runner.py"), "--inputs", str(inputs), "--out", str(out),
           "--presses", args.kvpress_presses, "--budgets", args.budgets, "--decode-steps", str(args.decode_steps),
           "--threads", str(args.threads)]
    if args.kvpress_check:
        cmd += ["--check", str(args.kvpress_check)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(cmd, check=True, env=env)
    return [{"context": ctx, **r} for r in json.loads(out.read_text())["rows"]]


def show(row: dict, full: dict) -> str:
    ppl, mib, speed = row["perplexity"], row["cache_bytes"] / 2 ** 20, row["decode_tok_s"]
    return (f"{row['method']:>20} {row['budget']:>6.2f} {ppl:>10.3f} {ppl / full['perplexity']:>8.4f} "
            f"{row['needle']:>6.2f} {mib:>9.2f} {row['cache_bytes'] / full['cache_bytes']:>7.3f} "
            f"{speed:>8.2f} {speed / full['decode_tok_s']:>7.2f}")


@torch.no_grad()
def timed_nll(model, ids: torch.Tensor, cont: torch.Tensor) -> tuple[float, float]:
    """(prefill seconds, summed NLL of ``cont`` after ``ids``); under block_sparse the prompt pass (no mask, long)
    is block-sparse and the continuation (mask not None) dense."""
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    first = model(ids[None], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1:]
    seconds = time.perf_counter() - t0
    rest = model(cont[None, :-1], cache=cache, use_cache=True).logits[0]
    logp = torch.log_softmax(torch.cat([first, rest]).float(), dim=-1)
    return seconds, float(-logp.gather(1, cont[:, None]).sum())


def block_sparse_rows(model, ctx: int, ppl_texts, times, settings: list[tuple[int, float]]) -> list[dict]:
    """Block-sparse prefill vs dense on the first perplexity text: dense timed twice (the capture prefill and a plain
    pass right after the sparse ones; the faster counts), attention's share of the dense prefill."""
    ids, cont = ppl_texts[0]
    rows = []
    for block, density in settings:
        with block_sparse(model, block=block, density=density, min_tokens=1024):
            seconds, nll = timed_nll(model, ids, cont)
        rows.append({"context": ctx, "block": block, "density": density, "sparse_prefill_s": seconds,
                     "sparse_perplexity": math.exp(nll / cont.numel())})
    dense_s, dense_nll = timed_nll(model, ids, cont)
    dense_s = min(dense_s, times[0][0])
    for r in rows:
        r.update(dense_prefill_s=dense_s, speedup=dense_s / r["sparse_prefill_s"],
                 dense_perplexity=math.exp(dense_nll / cont.numel()), attention_share=times[0][1] / times[0][0])
        r["perplexity_ratio"] = r["sparse_perplexity"] / r["dense_perplexity"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="2048", help="comma-separated prompt lengths")
    ap.add_argument("--methods", default="streaming,h2o,snapkv,merge")
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--variants", default="", help="extra method settings at every budget, method:key=value,... "
                    "(e.g. snapkv:window=8: an observation window as long as the passkey question)")
    ap.add_argument("--skip", default="", help="method:budget pairs not run, e.g. h2o:0.1 (h2o scores every "
                    "prompt query: minutes per press at 8k on one core)")
    ap.add_argument("--samples", type=int, default=1, help="perplexity offsets per context")
    ap.add_argument("--chunk", type=int, default=128, help="tokens scored after the context")
    ap.add_argument("--needles", type=int, default=4, help="passkey prompts per context")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--block-contexts", default="", help="contexts timed for block-sparse prefill (default: longest)")
    ap.add_argument("--block-settings", default="64:0.1", help="block-sparse prefill: block:density,...")
    ap.add_argument("--kvpress", action="store_true", help="also run NVIDIA kvpress's presses (own venv)")
    ap.add_argument("--kvpress-presses", default="streaming,snapkv,knorm,tova,expected")
    ap.add_argument("--kvpress-venv", default=str(HERE / "results" / ".venv-kvpress"))
    ap.add_argument("--kvpress-check", type=int, default=0, help="runner --check tokens (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    model, tok = load_model("default")
    tokens = data.tokenize(tok, data.read_text("shakespeare", "eval"))
    budgets = [float(b) for b in args.budgets.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    block_contexts = [int(c) for c in args.block_contexts.split(",")] if args.block_contexts else [max(contexts)]
    settings = [(int(b), float(d)) for b, d in (x.split(":") for x in args.block_settings.split(","))]
    skip = {(m, float(b)) for m, b in (x.split(":") for x in args.skip.split(",") if x)}
    variants = [(m, {}) for m in args.methods.split(",")]
    for x in filter(None, args.variants.split(",")):  # method:key=value -> a named variant at every budget
        m, opt = x.split(":")
        variants.append((m, {opt.split("=")[0]: int(opt.split("=")[1])}))
    configs = [None] + [KVConfig(method=m, budget=b, **o) for m, o in variants for b in budgets
                        if (m, b) not in skip]
    results: dict = {"rows": [], "block_sparse": [], "settings": vars(args)}
    for ctx in contexts:
        starts = torch.linspace(0, tokens.numel() - ctx - args.chunk, args.samples).long().tolist()
        ppl_texts = [(tokens[s:s + ctx], tokens[s + ctx:s + ctx + args.chunk]) for s in starts]
        needles = needle_prompts(tok, tokens, ctx, args.needles)
        rows, times = measure(model, tok, ctx, ppl_texts, needles, configs, args.decode_steps)
        full = rows[0]
        print(f"\ncontext {ctx}: dense prefill {times[0][0]:.2f} s ({times[0][1] / times[0][0]:.0%} in attention); "
              f"{args.samples} x {args.chunk} scored tokens, {args.needles} passkeys, {args.decode_steps} decode "
              f"steps; load average {os.getloadavg()}")
        print(f"{'method':>20} {'budget':>6} {'ppl':>10} {'ppl/full':>8} {'needle':>6} {'cache MiB':>9} "
              f"{'/full':>7} {'tok/s':>8} {'/full':>7}")
        for row in rows:
            print(show(row, full), flush=True)
        if ctx in block_contexts:
            for bs in block_sparse_rows(model, ctx, ppl_texts, times, settings):
                results["block_sparse"].append(bs)
                print(f"block-sparse prefill at {ctx} (block {bs['block']}, density {bs['density']}): "
                      f"{bs['sparse_prefill_s']:.2f} s vs dense {bs['dense_prefill_s']:.2f} s = {bs['speedup']:.2f}x "
                      f"(dense: {bs['attention_share']:.0%} in attention); perplexity {bs['sparse_perplexity']:.3f} "
                      f"vs {bs['dense_perplexity']:.3f} (x{bs['perplexity_ratio']:.4f})", flush=True)
        if args.json:  # ours first: kvpress's rows come after minutes more
            Path(args.json).write_text(json.dumps({**results, "rows": results["rows"] + rows}, indent=1))
        if args.kvpress:
            rows += kvpress_rows(args, ctx, ppl_texts, needles)
            for row in rows[len(configs):]:
                print(show(row, full), flush=True)
        results["rows"] += rows
        if args.json:  # after every context: a long run that is stopped keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
