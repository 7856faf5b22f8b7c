"""The kernels as torch custom ops (``torch.ops.sparsecraft.*``), so ``torch.compile`` can trace models that call them.

Each op is opaque to the compiler: it has a fake (meta) implementation that gives the output's shape and dtype, and
its real implementation calls the compiled kernel of the chosen ISA ("" = ``build.current_isa()`` when it runs), or
the plain-torch reference. Eager code calls the extension directly (kernels/__init__.py): the dispatcher round trip
of a custom op costs microseconds, which batch-1 decode pays about 200 times per token; under ``torch.compile`` the
same Python functions call these ops instead (``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsecraft.kernels.build import load_kernels
from sparsecraft.kernels.layout import BitmaskLayout, CsrLayout, layout_to_dense
from sparsecraft.kernels.reference import sparse_linear_ref


def _ext(isa: str, values: Tensor, x: Tensor | None = None):
    """The extension module for ``isa`` ("" = current), or None when the reference must run."""
    if values.dtype not in (torch.float32, torch.bfloat16):
        return None
    if x is not None and x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return load_kernels(isa or None)


def _ref_linear(layout, x: Tensor, bias: Tensor | None) -> Tensor:
    y = sparse_linear_ref(layout, x.reshape(-1, layout.shape[1]), bias)  # (tokens, rows)
    return y.reshape(*x.shape[:-1], layout.shape[0])


@torch.library.custom_op("sparsecraft::bitmask_linear", mutates_args=(), device_types="cpu")
def bitmask_linear(mask: Tensor, values: Tensor, row_ptr: Tensor, cols: int, x: Tensor, bias: Tensor | None,
                   skip_zero_bytes: bool, isa: str) -> Tensor:
    """x (..., cols) -> (..., rows) in x's dtype through the bitmask layout (mask, values, row_ptr)."""
    ext = _ext(isa, values, x)
    if ext is None:
        return _ref_linear(BitmaskLayout(mask, values, row_ptr, cols, skip_zero_bytes), x, bias)
    return ext.bitmask_linear(mask, values, row_ptr, cols, x, bias, skip_zero_bytes)


@bitmask_linear.register_fake
def _(mask, values, row_ptr, cols, x, bias, skip_zero_bytes, isa):
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


@torch.library.custom_op("sparsecraft::csr_linear", mutates_args=(), device_types="cpu")
def csr_linear(col: Tensor, values: Tensor, row_ptr: Tensor, cols: int, x: Tensor, bias: Tensor | None,
               isa: str) -> Tensor:
    """x (..., cols) -> (..., rows) in x's dtype through the CSR layout (col, values, row_ptr)."""
    ext = _ext(isa, values, x)
    if ext is None:
        return _ref_linear(CsrLayout(col, values, row_ptr, cols), x, bias)
    return ext.csr_linear(col, values, row_ptr, cols, x, bias)


@csr_linear.register_fake
def _(col, values, row_ptr, cols, x, bias, isa):
    return x.new_empty((*x.shape[:-1], row_ptr.shape[0] - 1))


@torch.library.custom_op("sparsecraft::bitmask_expand", mutates_args=(), device_types="cpu")
def bitmask_expand(mask: Tensor, values: Tensor, row_ptr: Tensor, cols: int, to_f32: bool, isa: str) -> Tensor:
    """The dense weight (rows, cols), fp32 when ``to_f32`` else the values' dtype."""
    ext = _ext(isa, values)
    if ext is None:
        dense = layout_to_dense(BitmaskLayout(mask, values, row_ptr, cols, False))
        return dense.float() if to_f32 else dense
    return ext.bitmask_expand(mask, values, row_ptr, cols, 0, mask.shape[0], to_f32)[:, :cols].contiguous()


@bitmask_expand.register_fake
def _(mask, values, row_ptr, cols, to_f32, isa):
    return values.new_empty((mask.shape[0], cols), dtype=torch.float32 if to_f32 else values.dtype)


@torch.library.custom_op("sparsecraft::csr_expand", mutates_args=(), device_types="cpu")
def csr_expand(col: Tensor, values: Tensor, row_ptr: Tensor, cols: int, to_f32: bool, isa: str) -> Tensor:
    """The dense weight (rows, cols), fp32 when ``to_f32`` else the values' dtype."""
    ext = _ext(isa, values)
    if ext is None:
        dense = layout_to_dense(CsrLayout(col, values, row_ptr, cols))
        return dense.float() if to_f32 else dense
    return ext.csr_expand(col, values, row_ptr, cols, 0, row_ptr.shape[0] - 1, to_f32)


@csr_expand.register_fake
def _(col, values, row_ptr, cols, to_f32, isa):
    return values.new_empty((row_ptr.shape[0] - 1, cols), dtype=torch.float32 if to_f32 else values.dtype)


def linear_op(layout: BitmaskLayout | CsrLayout, x: Tensor, bias: Tensor | None, isa: str) -> Tensor:
    """The custom-op call for one layout (what traced code runs)."""
    if isinstance(layout, CsrLayout):
        return torch.ops.sparsecraft.csr_linear(layout.col, layout.values, layout.row_ptr, layout.cols, x, bias, isa)
    return torch.ops.sparsecraft.bitmask_linear(layout.mask, layout.values, layout.row_ptr, layout.cols, x, bias,
                                                layout.skip_zero_bytes, isa)


def expand_op(layout: BitmaskLayout | CsrLayout, to_f32: bool, isa: str) -> Tensor:
    if isinstance(layout, CsrLayout):
        return torch.ops.sparsecraft.csr_expand(layout.col, layout.values, layout.row_ptr, layout.cols, to_f32, isa)
    return torch.ops.sparsecraft.bitmask_expand(layout.mask, layout.values, layout.row_ptr, layout.cols, to_f32, isa)
