"""CPU kernels for sparse x dense products, each with a plain-torch reference (see docs/kernels.md).

Every kernel runs on one of ``available_isas()`` ("avx512", "avx2", "ref"), the fastest by default; choose one per
call with ``isa=`` or for a block of code with ``isa_scope(isa)``. Under ``torch.compile`` the same functions call
the custom ops of kernels/ops.py (``torch.ops.sparsecraft.*``), which the compiler can trace.
"""

from __future__ import annotations

import torch

from sparsecraft.kernels import ops
from sparsecraft.kernels.build import ISAS, available_isas, current_isa, isa_scope, load_kernels
from sparsecraft.kernels.layout import (
    KERNEL_DTYPES,
    BitmaskLayout,
    CsrLayout,
    Layout,
    layout_to_dense,
    make_layout,
)
from sparsecraft.kernels.reference import sparse_linear_ref


_X_DTYPES = KERNEL_DTYPES + (torch.float16,)


def kernel_supported(layout: Layout, x: torch.Tensor) -> bool:
    """True when the compiled kernel can run this product (fp32/bf16 weights, float activations)."""
    return layout.values.dtype in KERNEL_DTYPES and x.dtype in _X_DTYPES


def _check_width(layout: Layout, x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] != layout.shape[1]:
        raise ValueError(f"x must be (..., {layout.shape[1]}) for this ({layout.shape[0]} x {layout.shape[1]}) "
                         f"weight, got shape {tuple(x.shape)}")


def sparse_linear(
    layout: Layout, x: torch.Tensor, bias: torch.Tensor | None = None, use_kernel: bool = True,
    isa: str | None = None,
) -> torch.Tensor:
    """x (..., cols) -> x @ W.T + bias, (..., rows) in x's dtype; W is the sparse weight ``layout`` holds.
    ``isa``: "avx512" | "avx2" | "ref" (default: ``current_isa()``); ``use_kernel=False`` is "ref"."""
    if torch.compiler.is_compiling():
        return ops.linear_op(layout, x, bias, isa or "" if use_kernel else "ref")
    _check_width(layout, x)
    ext = load_kernels(isa) if use_kernel and kernel_supported(layout, x) else None
    if ext is None:
        y = sparse_linear_ref(layout, x.reshape(-1, layout.shape[1]), bias)  # (tokens, rows)
        return y.reshape(*x.shape[:-1], layout.shape[0])
    if isinstance(layout, CsrLayout):
        return ext.csr_linear(layout.col, layout.values, layout.row_ptr, layout.cols, x, bias)
    return ext.bitmask_linear(layout.mask, layout.values, layout.row_ptr, layout.cols, x, bias,
                              layout.skip_zero_bytes)


def expand_dense(
    layout: Layout,
    use_kernel: bool = True,
    rows: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    isa: str | None = None,
) -> torch.Tensor:
    """The exact dense weight, rows [r0, r1) (default all) -> (r1 - r0, cols), in ``dtype`` (default the
    values' dtype; fp32 from bf16 is exact); through the compiled expander of ``isa`` when it can run, which then
    writes into the flat fp32/values-dtype buffer ``out`` when given (>= (r1 - r0) x padded cols; reused across
    prefill tiles)."""
    r0, r1 = rows if rows is not None else (0, layout.shape[0])
    dtype = dtype or layout.values.dtype
    ext = load_kernels(isa) if use_kernel else None
    if ext is None or layout.values.dtype not in KERNEL_DTYPES or dtype not in (layout.values.dtype, torch.float32):
        return layout_to_dense(layout, (r0, r1)).to(dtype)
    to_f32 = dtype == torch.float32
    if isinstance(layout, CsrLayout):
        return ext.csr_expand(layout.col, layout.values, layout.row_ptr, layout.cols, r0, r1, to_f32, out)
    dense = ext.bitmask_expand(layout.mask, layout.values, layout.row_ptr, layout.cols, r0, r1, to_f32, out)
    return dense[:, : layout.cols]


# Bytes of one prefill tile of expanded fp32 weight: 8 MiB (512 rows at 4096 columns) lives in the shared 32 MiB L3
# while torch's GEMM reads it. Every tile is one GEMM that re-packs x, so from 512 tokens on the tile grows with the
# tokens (16 MiB at 512, 64 MiB = a whole 4096x4096 layer at 2048). Measured at 512 / 2048 tokens on 4096x4096
# (same run): 256-row tiles with a transposed output 1.09x / 0.84x of dense; 512-row tiles in the dense GEMM's own
# orientation 1.16x / 1.00x; one whole-layer tile at 2048 tokens 1.11x.
# Capped at 32 MiB: glibc serves larger blocks with a fresh mmap on every call, and faulting in 64 MiB of new pages
# costs about 5% of a 2048-token GEMM.
PREFILL_TILE_BYTES = 8 << 20
PREFILL_TILE_MAX_BYTES = 32 << 20


def dense_tiles_linear(
    layout: Layout, x: torch.Tensor, bias: torch.Tensor | None = None, use_kernel: bool = True,
    isa: str | None = None,
) -> torch.Tensor:
    """The prefill path: x (tokens, cols) -> (tokens, rows) in x's dtype, through fp32 dense GEMMs on weight tiles
    expanded on the fly into one reused buffer (no full dense copy; bf16 weights also avoid torch's slow AVX2 bf16
    GEMM)."""
    if torch.compiler.is_compiling():  # one whole-layer expansion, traced as a custom op
        weight = ops.expand_op(layout, True, isa or "" if use_kernel else "ref")  # (rows, cols) fp32
        return torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)
    rows, cols = layout.shape
    padded = (cols + 63) // 64 * 64
    tile_bytes = min(PREFILL_TILE_BYTES * max(1, x.shape[0] // 256), PREFILL_TILE_MAX_BYTES)
    step = min(rows, max(8, tile_bytes // (4 * padded)))
    xf = x.float()  # (tokens, cols)
    out = torch.empty(x.shape[0], rows, dtype=torch.float32)
    weight_buffer = torch.empty(step * padded, dtype=torch.float32)
    if step == rows:  # one tile: the GEMM writes the output directly
        torch.mm(xf, expand_dense(layout, use_kernel, None, torch.float32, weight_buffer, isa).t(), out=out)
    else:
        product = torch.empty(x.shape[0], step, dtype=torch.float32)
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            tile = expand_dense(layout, use_kernel, (r0, r1), torch.float32, weight_buffer, isa)  # (r1 - r0, cols)
            part = product[:, : r1 - r0]
            torch.mm(xf, tile.t(), out=part) if r1 - r0 == step else part.copy_(xf @ tile.t())
            out[:, r0:r1] = part
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


__all__ = [
    "ISAS",
    "available_isas",
    "current_isa",
    "dense_tiles_linear",
    "isa_scope",
    "BitmaskLayout",
    "CsrLayout",
    "Layout",
    "expand_dense",
    "load_kernels",
    "make_layout",
    "sparse_linear",
    "sparse_linear_ref",
]
