"""Perplexity, wall time and peak memory of magnitude / wanda / sparsegpt on SmolLM2-135M (issue 2's table).

Each configuration runs in its own process so its peak RSS is its own. Usage:
    python bench/bench_prune.py [--nsamples 64 --seqlen 512 --eval-windows 16] [--out bench/results/prune.jsonl]
Prints a Markdown table at the end. Takes about 30-60 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("dense", "unstructured", 0.0)] + [
    (m, p, s) for p, s in [("unstructured", 0.5), ("2:4", None), ("unstructured", 0.7)]
    for m in ("magnitude", "wanda", "sparsegpt")
]


def run_one(method: str, pattern: str, sparsity: float | None, args: argparse.Namespace) -> dict:
    import torch

    from sparsecraft import data, evaluate
    from sparsecraft.api import prune
    from sparsecraft.memory import PeakMemory
    from sparsecraft.models import load_model

    model, tok = load_model(None)
    calib = data.calibration_data(tok, "shakespeare", args.nsamples, args.seqlen, seed=0)
    windows = data.evaluation_data(tok, "shakespeare", args.seqlen,
                                args.eval_windows)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    realized = 0.0
    with PeakMemory() as memory:
        if method != "dense":
            result = prune(model, method, sparsity, pattern, calib, progress=False)
            realized = result.sparsity
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ppl = evaluate.perplexity(model, windows)
    return {"method": method, "pattern": pattern, "sparsity": sparsity, "realized": realized, "ppl": ppl,
            "prune_s": seconds, "peak_rss_mb": peak, "rss_before_mb": rss0, "threads": torch.get_num_threads(),
            "prune_added_rss_mb": memory.added_rss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", default="bench/results/prune.jsonl")
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "PATTERN", "SPARSITY"))
    args = ap.parse_args()
    if args.one:
        m, p, s = args.one
        print(json.dumps(run_one(m, p, None if s == "None" else float(s), args)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for m, p, s in CONFIGS:
        cmd = [sys.executable, __file__, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--eval-windows", str(args.eval_windows), "--one", m, p, str(s)]
        line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(line))
        with out.open("a") as f:
            f.write(line + "\n")
        print(line, flush=True)
    print("\n| method | pattern | realized sparsity | perplexity | prune time (s) | memory added by the prune (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['pattern'] if r['method'] != 'dense' else '-'} | {r['realized']:.4f} | "
              f"{r['ppl']:.2f} | {r['prune_s']:.1f} | {r.get('prune_added_rss_mb', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
