"""Throwaway probe: AVX-512 bitmask GEMV inner-loop variants (bench/probe_expand.cpp) vs torch's dense GEMV, batch 1.

    python bench/probe_expand.py --sparsity 0.5 --dtype fp32 --copies 0   # 0 = stream (copies beyond the LLC)

Prints, per variant, the median ms of one call and dense/variant, all timed interleaved in one process.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from sparsecraft.kernels import make_layout, sparse_linear
from sparsecraft.kernels.measure import Cycle, copies_to_stream, time_interleaved
from sparsecraft.patterns import topk_mask

VARIANTS = {0: "reg-expand", 1: "mem-expandload", 2: "reg+pf512", 3: "mem+pf512", 4: "2rows-reg", 5: "2rows-mem",
            6: "reg+pf1024", 7: "2rows-mem+pf512", 8: "2rows-mem+pf1k"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--copies", type=int, default=0)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="0,1,2,3,4,5,6")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from torch.utils.cpp_extension import load

    from sparsecraft.kernels.build import FLAGS, _ninja_on_path

    _ninja_on_path()
    ext = load(name="sparsecraft_probe_expand", sources=[str(Path(__file__).with_suffix(".cpp"))],
               extra_cflags=FLAGS["avx512"], extra_ldflags=["-fopenmp"])
    rows, cols = (int(v) for v in args.shape.split("x"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    w = torch.randn(rows, cols)
    keep = topk_mask(w.abs(), None if args.sparsity == "2:4" else float(args.sparsity),
                     "2:4" if args.sparsity == "2:4" else "unstructured")
    wd = torch.where(keep, w, 0.0).to(dtype)
    lay = make_layout(wd, keep, "bitmask")
    x = torch.randn(cols)
    xd = x.to(dtype)
    ref = (wd.float() @ x)
    for v in [int(s) for s in args.variants.split(",")]:
        torch.testing.assert_close(ext.gemv(lay.mask, lay.values, lay.row_ptr, x, v, rows // args.threads), ref,
                                   rtol=1e-4, atol=1e-3)
    dense_bytes = wd.numel() * wd.element_size()
    sparse_bytes = sum(t.numel() * t.element_size() for t in (lay.mask, lay.values, lay.row_ptr))
    n = args.copies or copies_to_stream(sparse_bytes)
    ws = [wd.clone() for _ in range(n)]
    ws32 = [w.clone() for w in ws] if dtype == torch.float32 else ws
    lays = [lay] + [type(lay)(lay.mask.clone(), lay.values.clone(), lay.row_ptr.clone(), lay.cols, False)
                    for _ in range(n - 1)]
    g = rows // args.threads
    fns = {"torch dense": Cycle(lambda wi: torch.nn.functional.linear(xd, wi), ws),
           "kernel avx512": Cycle(lambda l: sparse_linear(l, xd, isa="avx512"), lays),
           "kernel avx2": Cycle(lambda l: sparse_linear(l, xd, isa="avx2"), lays)}
    if dtype == torch.float32:
        fns["own dense"] = Cycle(lambda wi: ext.dense_gemv(wi, x, g), ws32)
    for v in [int(s) for s in args.variants.split(",")]:
        fns[VARIANTS[v]] = Cycle(lambda l, v=v: ext.gemv(l.mask, l.values, l.row_ptr, x, v, g), lays)
    with torch.inference_mode():
        t = time_interleaved(fns, args.rounds, calls=max(3, n))
    load = os.getloadavg()
    print(f"{args.shape} {args.dtype} sparsity={args.sparsity} copies={n} threads={args.threads} "
          f"load={load[0]:.2f} ideal={dense_bytes / sparse_bytes:.2f}x")
    for name, s in t.items():
        print(f"  {name:>15} {s * 1e3:8.3f} ms  {t['torch dense'] / s:5.2f}x  {dense_bytes / s / 1e9 if 'dense' in name else sparse_bytes / s / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
