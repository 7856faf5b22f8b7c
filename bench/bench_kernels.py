"""Batch-1..8 sparse kernels vs dense torch.nn.functional.linear, per ISA, measured in the same run, interleaved.

    python bench/bench_kernels.py                      # 4096x4096 and 11008x4096, fp32 + bf16, batch 1, every ISA
    python bench/bench_kernels.py --batch-sizes 1,4,8  # decode batches
    python bench/bench_kernels.py --isas avx2          # one ISA (avx512 | avx2 | ref; default: all this CPU runs)
    python bench/bench_kernels.py --prefill            # tokens 8..512: sparse kernel vs expand+dense vs dense

Every call reads its weight from memory, as a decode step does: each side cycles through enough distinct copies of
the weight to exceed twice the last-level cache (``--copies`` overrides; 1 = the old hot-cache timing, where a 70%
sparse 4096x4096 weight fits in a 32 MiB L3 and looks faster than it is).
Prints medians, the ratio dense/sparse per ISA, and how close each run gets to the bytes-moved limit: the ideal
speedup is dense bytes / packed bytes (../shared/FIELD.md), and "% limit" = measured ratio / ideal ratio.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from sparsecraft.kernels import available_isas, sparse_linear
from sparsecraft.kernels.measure import Cycle, copies_to_stream, read_bandwidth, tensor_bytes, time_interleaved
from sparsecraft.patterns import topk_mask
from sparsecraft.modules.sparse_linear import SparseLinear

CASES = {"50%": ("unstructured", 0.5), "2:4": ("2:4", None), "70%": ("unstructured", 0.7), "80%": ("unstructured", 0.8),
         "90%": ("unstructured", 0.9)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_pair(rows: int, cols: int, dtype: torch.dtype, case: str) -> tuple[torch.Tensor, SparseLinear]:
    """A random dense weight pruned by magnitude -> (masked dense weight, SparseLinear of the same weight)."""
    pattern, sparsity = CASES[case]
    lin = nn.Linear(cols, rows, bias=False)
    keep = topk_mask(lin.weight.detach().abs(), sparsity, pattern)
    lin = lin.to(dtype)
    sparse = SparseLinear.from_dense(lin, keep, pattern)
    sparse.dense_min_tokens = 10**9  # measure the kernel itself here
    return torch.where(keep, lin.weight.detach(), torch.zeros((), dtype=dtype)), sparse


def decode_table(shapes, dtypes, cases, batches, rounds, isas, copies) -> None:
    bw = read_bandwidth()
    print(f"threads={torch.get_num_threads()} read bandwidth={bw / 1e9:.1f} GB/s isas={','.join(isas)} "
          f"load={os.getloadavg()[0]:.2f}")
    print(f"{'shape':>11} {'dtype':>5} {'case':>4} {'B':>2} {'layout':>7} {'copies':>6} {'dense ms':>9} "
          + " ".join(f"{isa + ' ms':>10} {'speedup':>7}" for isa in isas) + f" {'ideal':>6} {'% limit':>7} {'load':>5}")
    for rows, cols in shapes:
        for dname in dtypes:
            for case in cases:
                w, sparse = make_pair(rows, cols, DTYPES[dname], case)
                n = copies or copies_to_stream(min(tensor_bytes(w), sparse.nbytes))  # both sides stream
                ws = [w.clone() for _ in range(n)]
                layouts = [sparse.layout] + [type(sparse.layout)(*[getattr(sparse.layout, f).clone()
                                                                  if isinstance(getattr(sparse.layout, f), torch.Tensor)
                                                                  else getattr(sparse.layout, f)
                                                                  for f in sparse.layout.__dataclass_fields__])
                                             for _ in range(n - 1)]
                for b in batches:
                    x = torch.randn(b, cols).to(DTYPES[dname])
                    fns = {"dense": Cycle(lambda wi: torch.nn.functional.linear(x, wi), ws)}
                    for isa in isas:
                        fns[isa] = Cycle(lambda lay, isa=isa: sparse_linear(lay, x, isa=isa), layouts)
                    t = time_interleaved(fns, rounds, calls=max(3, n))
                    ideal = tensor_bytes(w) / sparse.nbytes
                    cells = " ".join(f"{t[isa] * 1e3:10.3f} {t['dense'] / t[isa]:6.2f}x" for isa in isas)
                    best = max(t["dense"] / t[isa] for isa in isas)
                    print(f"{rows:>5}x{cols:<5} {dname:>5} {case:>4} {b:>2} {sparse.kind:>7} {n:>6} "
                          f"{t['dense'] * 1e3:9.3f} {cells} {ideal:5.2f}x {100 * best / ideal:6.0f}% {os.getloadavg()[0]:5.2f}",
                          flush=True)
                del ws, layouts


def prefill_table(shape, dtypes, cases, tokens, rounds) -> None:
    """Many tokens: dense vs the sparse kernel vs SparseLinear's rule (expand + dense GEMM from DENSE_MIN_TOKENS)."""
    rows, cols = shape
    print(f"{'shape':>11} {'dtype':>5} {'case':>4} {'tokens':>6} {'dense ms':>9} {'kernel':>7} {'expand+gemm':>11} {'module':>7}")
    for dname in dtypes:
        for case in cases:
            w, sparse = make_pair(rows, cols, DTYPES[dname], case)
            ruled = SparseLinear(sparse.layout, None, sparse.pattern)  # default prefill rule
            expand = SparseLinear(sparse.layout, None, sparse.pattern)
            expand.dense_min_tokens = 1
            for n in tokens:
                x = torch.randn(n, cols).to(DTYPES[dname])
                t = time_interleaved({"dense": lambda: torch.nn.functional.linear(x, w), "kernel": lambda: sparse(x),
                                      "expand": lambda: expand(x), "module": lambda: ruled(x)}, rounds, calls=1)
                print(f"{rows:>5}x{cols:<5} {dname:>5} {case:>4} {n:>6} {t['dense'] * 1e3:9.2f} "
                      f"{t['dense'] / t['kernel']:6.2f}x {t['dense'] / t['expand']:10.2f}x {t['dense'] / t['module']:6.2f}x",
                      flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,11008x4096")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--cases", default="50%,2:4,70%,90%")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--isas", default=None, help="comma list of avx512,avx2,ref (default: every compiled ISA this CPU runs)")
    p.add_argument("--copies", type=int, default=0, help="weight copies cycled per side (default: exceed 2x the LLC)")
    p.add_argument("--prefill", action="store_true", help="measure tokens 8..512 on the first shape instead")
    p.add_argument("--tokens", default="8,16,32,64,128,512")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    isas = args.isas.split(",") if args.isas else [i for i in available_isas() if i != "ref"] or ["ref"]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtypes, cases = args.dtypes.split(","), args.cases.split(",")
    with torch.inference_mode():
        if args.prefill:
            prefill_table(shapes[0], dtypes, cases, [int(t) for t in args.tokens.split(",")], args.rounds)
        else:
            decode_table(shapes, dtypes, cases, [int(b) for b in args.batch_sizes.split(",")], args.rounds, isas,
                         args.copies)


if __name__ == "__main__":
    main()
