"""Activation-sparse products for batch-1 decoding: read only the weight columns whose input survives its threshold.

The weight is kept transposed, ``wt = W.T.contiguous()`` (in, out), so the column W[:, j] is one contiguous row of
``wt``; the AVX2 kernel (csrc/colsparse_cpu.cpp) reads density * dense bytes. ``colsparse_linear_ref`` is the
plain-torch reference and the fallback: it masks x and multiplies densely.

A pruned weight can be both: ``colsparse_bitmask_linear`` takes the bitmask layout of W.T (kernels/layout.py), so a
skipped input skips its column and a kept input reads only the column's kept weights (bytes read: activation
density x (weight density x itemsize + 1/8) per weight).
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from sparsecraft.kernels.build import build_extension
from sparsecraft.kernels.layout import BitmaskLayout, bitmask_layout, layout_to_dense

SOURCE = Path(__file__).parent / "csrc" / "colsparse_cpu.cpp"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
_NO_SCALE = torch.empty(0)  # the kernel reads an empty scale as "all ones"


@functools.cache  # one compiled module per process, like kernels.build.load_kernels
def load_colsparse() -> ModuleType | None:
    """The compiled activation-sparse kernel module, or None when it cannot be built here."""
    return build_extension("sparsecraft_colsparse", SOURCE, "activation-sparse products")


def transpose_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) -> the kernel's (in, out) contiguous layout."""
    return weight.detach().t().contiguous()


def colsparse_linear_ref(wt: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None,
                         threshold: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) -> (..., out): W @ (x where |x| * scale > threshold else 0) + bias, accumulated in fp32."""
    xf = x.float()
    score = xf.abs() if scale is None else xf.abs() * scale.float()
    xs = torch.where(score > threshold, xf, torch.zeros((), dtype=torch.float32))
    y = F.linear(xs, wt.float().t(), None if bias is None else bias.float())
    return y.to(x.dtype)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _kernel_args(x: torch.Tensor, scale: torch.Tensor | None, threshold: float, bias: torch.Tensor | None) -> tuple:
    """The (x, scale, threshold, bias) arguments both GEMV kernels take: fp32, contiguous, empty scale = all ones."""
    return (_f32(x).view(-1), _NO_SCALE if scale is None else _f32(scale), float(threshold),
            None if bias is None else _f32(bias))


def _shaped(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A kernel's (out,) fp32 result -> x's leading shape and dtype."""
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def colsparse_linear(wt: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None, threshold: float = 0.0,
                     bias: torch.Tensor | None = None, use_kernel: bool = True) -> torch.Tensor:
    """Same result as ``colsparse_linear_ref``; one token (x.numel() == in) runs the AVX2 kernel when it can.

    Batch-1 decode calls this once per Linear per token, so the Python side does as few torch calls as it can
    (each costs about a microsecond, the kernel itself a few to a few hundred).
    """
    ext = None
    if use_kernel and x.numel() == wt.shape[0] and wt.dtype in WEIGHT_DTYPES and wt.device.type == "cpu":
        ext = load_colsparse()
    if ext is None:
        return colsparse_linear_ref(wt, x, scale, threshold, bias)
    return _shaped(ext.colsparse_gemv(wt, *_kernel_args(x, scale, threshold, bias)), x)


def transposed_bitmask(weight: torch.Tensor, keep: torch.Tensor) -> BitmaskLayout:
    """Pruned weight (out, in) and its keep-mask -> the bitmask layout of W.T (rows = inputs, bits = outputs)."""
    return bitmask_layout(weight.detach().t().contiguous(), keep.t().contiguous())


def colsparse_bitmask_linear(layout_t: BitmaskLayout, x: torch.Tensor, scale: torch.Tensor | None = None,
                             threshold: float = 0.0, bias: torch.Tensor | None = None,
                             use_kernel: bool = True) -> torch.Tensor:
    """x (..., in) -> (..., out) through a pruned weight held as ``transposed_bitmask``: the same numbers as
    ``colsparse_linear_ref`` on the dense W.T; one token runs the AVX2 kernel when it can."""
    in_features, out_features = layout_t.shape
    ext = None
    if use_kernel and x.numel() == in_features and layout_t.values.dtype in WEIGHT_DTYPES:
        ext = load_colsparse()
    if ext is None:
        return colsparse_linear_ref(layout_to_dense(layout_t), x, scale, threshold, bias)
    y = ext.colsparse_bitmask_gemv(layout_t.mask, layout_t.values, layout_t.row_ptr, out_features,
                                   *_kernel_args(x, scale, threshold, bias))
    return _shaped(y, x)
