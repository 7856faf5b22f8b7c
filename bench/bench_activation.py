"""Activation-sparse GEMV (batch 1) vs dense torch.nn.functional.linear, measured in the same run, interleaved.

    python bench/bench_activation.py                     # 4 shapes x 40/50/70% x fp32, 2 threads
    python bench/bench_activation.py --dtypes fp32,bf16 --threads 1

A shape is out x in (576x1536 is SmolLM2's down_proj). x is Gaussian; the threshold is the quantile of |x| that
zeroes the given fraction, applied inside the kernel (the dense side multiplies the already-sparsified x, so both
compute the same product). Ratio = dense median / sparse median; ideal = 1 / density (bytes read).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparsecraft.kernels.colsparse import colsparse_linear, load_colsparse, transpose_weight
from sparsecraft.kernels.measure import time_interleaved

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def case(rows: int, cols: int, sparsity: float, dtype: torch.dtype, rounds: int) -> dict[str, float]:
    w = torch.randn(rows, cols).to(dtype)  # (out, in)
    wt = transpose_weight(w)  # (in, out)
    x = torch.randn(cols)
    t = float(x.abs().kthvalue(max(1, round(sparsity * cols))).values) if sparsity > 0 else 0.0
    xs = torch.where(x.abs() > t, x, torch.zeros(())).to(dtype).unsqueeze(0)  # (1, in)
    xk = x.to(dtype)
    times = time_interleaved({"dense": lambda: F.linear(xs, w),
                              "sparse": lambda: colsparse_linear(wt, xk, None, t)}, rounds)
    realized = float((xs == 0).float().mean())
    return {"dense": times["dense"], "sparse": times["sparse"], "realized": realized}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="576x1536,1536x576,4096x4096,11008x4096")
    p.add_argument("--sparsities", default="0.4,0.5,0.7")
    p.add_argument("--dtypes", default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=31)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if load_colsparse() is None:
        raise SystemExit("the AVX2 kernel could not be built here; nothing to measure")
    print(f"threads={torch.get_num_threads()} rounds={args.rounds} (medians of interleaved rounds of 3 calls)")
    print(f"{'shape':>11} {'dtype':>5} {'sparsity':>8} {'dense us':>9} {'sparse us':>9} {'speedup':>7} {'ideal':>6}")
    for shape in args.shapes.split(","):
        rows, cols = (int(v) for v in shape.split("x"))
        for dname in args.dtypes.split(","):
            for s in (float(v) for v in args.sparsities.split(",")):
                r = case(rows, cols, s, DTYPES[dname], args.rounds)
                print(f"{rows:>5}x{cols:<5} {dname:>5} {r['realized']:8.2f} {r['dense'] * 1e6:9.1f} "
                      f"{r['sparse'] * 1e6:9.1f} {r['dense'] / r['sparse']:6.2f}x {1 / (1 - r['realized']):5.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
