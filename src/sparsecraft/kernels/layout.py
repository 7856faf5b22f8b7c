"""Compute layouts for the CPU kernels, built exactly from a dense weight and its keep-mask.

- ``BitmaskLayout``: per row, 64-bit mask words + packed kept values (the on-disk bitmask format with rows
  padded to 64 columns, row offsets, and 8 values of padding so that vector loads may run past the end).
- ``CsrLayout``: per row, column indices (uint16 bits in an int16 tensor when cols <= 65536) + values; for very
  sparse weights, where skipping zeros beats expanding every 8 columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecraft.formats.bits import pack_bits

# Above this sparsity the CSR kernel wins at batch 1 (measured, docs/kernels.md): bitmask work is per 8 columns
# whatever the density, CSR work is per kept weight.
CSR_MIN_SPARSITY = 0.8
# Skip all-zero mask bytes (a branch) only when zero bytes come in runs, as in block-sparse weights: then the
# branch is predictable. Random 90% sparsity has 43% zero bytes scattered at random, and the branch costs 1.7x.
SKIP_MIN_ZERO_BYTES = 0.25
SKIP_MIN_RUN = 0.9  # P(next byte zero | this byte zero)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class BitmaskLayout:
    mask: torch.Tensor  # (rows, words) int64, bit c of word w = column 64 w + c
    values: torch.Tensor  # (nnz + 8,) fp32 or bf16, kept values row-major, then 8 zeros
    row_ptr: torch.Tensor  # (rows + 1,) int64 offsets into values
    cols: int
    skip_zero_bytes: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.mask.shape[0], self.cols)


@dataclass(frozen=True)
class CsrLayout:
    col: torch.Tensor  # (nnz,) int16 holding uint16 bits, or int32 when cols > 65536
    values: torch.Tensor  # (nnz,) fp32 or bf16
    row_ptr: torch.Tensor  # (rows + 1,) int64
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.row_ptr.numel() - 1, self.cols)


Layout = BitmaskLayout | CsrLayout


def _row_ptr(keep: torch.Tensor) -> torch.Tensor:
    row_ptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(keep.sum(1), 0, out=row_ptr[1:])
    return row_ptr


def bitmask_layout(weight: torch.Tensor, keep: torch.Tensor) -> BitmaskLayout:
    """weight (rows, cols), keep (rows, cols) bool -> BitmaskLayout; pure."""
    rows, cols = weight.shape
    words = (cols + 63) // 64
    keep_padded = torch.nn.functional.pad(keep, (0, words * 64 - cols))  # (rows, words * 64)
    mask_bytes = pack_bits(keep_padded)  # (rows, words * 8) uint8, little-endian
    values = torch.cat([weight[keep], torch.zeros(8, dtype=weight.dtype)])
    skip = _zero_bytes_in_runs(mask_bytes)
    return BitmaskLayout(mask_bytes.view(torch.int64).contiguous(), values, _row_ptr(keep), cols, skip)


def _zero_bytes_in_runs(mask_bytes: torch.Tensor) -> bool:
    zero = (mask_bytes == 0).reshape(-1)  # (rows * words * 8,)
    if zero.numel() < 2 or float(zero.float().mean()) < SKIP_MIN_ZERO_BYTES:
        return False
    run = (zero[1:] & zero[:-1]).sum() / zero[:-1].sum().clamp(min=1)
    return bool(run >= SKIP_MIN_RUN)


def csr_layout(weight: torch.Tensor, keep: torch.Tensor) -> CsrLayout:
    """weight (rows, cols), keep (rows, cols) bool -> CsrLayout; pure."""
    cols = weight.shape[1]
    col = keep.nonzero()[:, 1]  # (nnz,) row-major, like weight[keep]
    col = col.to(torch.int32).to(torch.int16) if cols <= 65536 else col.to(torch.int32)  # int16 keeps uint16 bits
    return CsrLayout(col.contiguous(), weight[keep].contiguous(), _row_ptr(keep), cols)


def make_layout(weight: torch.Tensor, keep: torch.Tensor, kind: str = "auto") -> Layout:
    """Pick the layout for a weight: ``"bitmask"``, ``"csr"`` or ``"auto"`` (CSR above CSR_MIN_SPARSITY)."""
    if kind not in ("auto", "bitmask", "csr"):
        raise ValueError(f"layout kind must be 'auto', 'bitmask' or 'csr', got {kind!r}")
    if kind == "auto":
        sparsity = 1.0 - float(keep.float().mean()) if keep.numel() else 0.0
        kind = "csr" if sparsity >= CSR_MIN_SPARSITY else "bitmask"
    return csr_layout(weight, keep) if kind == "csr" else bitmask_layout(weight, keep)


def layout_keep(layout: Layout) -> torch.Tensor:
    """The keep-mask (rows, cols) bool a layout encodes."""
    rows, cols = layout.shape
    if isinstance(layout, CsrLayout):
        keep = torch.zeros(rows, cols, dtype=torch.bool)
        keep[_row_index(layout.row_ptr), _col_index(layout)] = True
        return keep
    bits = layout.mask.view(torch.uint8).unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)  # (rows, words*8, 8)
    return (bits & 1).bool().reshape(rows, -1)[:, :cols]


def layout_values(layout: Layout) -> torch.Tensor:
    """(nnz,) kept values in row-major order."""
    nnz = int(layout.row_ptr[-1])
    return layout.values[:nnz]


def _row_index(row_ptr: torch.Tensor) -> torch.Tensor:
    counts = row_ptr[1:] - row_ptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel()), counts)  # (nnz,)


def _col_index(layout: CsrLayout) -> torch.Tensor:
    col = layout.col.to(torch.int64)
    return col & 0xFFFF if layout.col.dtype == torch.int16 else col  # undo the int16 wrap of uint16 bits


def layout_coo(layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (row (nnz,), col (nnz,), values (nnz,)) in row-major order."""
    if isinstance(layout, CsrLayout):
        return _row_index(layout.row_ptr), _col_index(layout), layout.values
    idx = layout_keep(layout).nonzero()
    return idx[:, 0], idx[:, 1], layout_values(layout)


def layout_to_dense(layout: Layout, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Exact dense weight rows [r0, r1) (default all) -> (r1 - r0, cols), zeros where pruned."""
    r0, r1 = rows if rows is not None else (0, layout.shape[0])
    if isinstance(layout, CsrLayout):  # slice the kept weights of the rows first
        a, b = int(layout.row_ptr[r0]), int(layout.row_ptr[r1])
        part = CsrLayout(layout.col[a:b], layout.values[a:b], layout.row_ptr[r0 : r1 + 1] - a, layout.cols)
        row, col, values = layout_coo(part)
    else:
        row, col, values = layout_coo(layout)
        inside = (row >= r0) & (row < r1)
        row, col, values = row[inside] - r0, col[inside], values[inside]
    dense = torch.zeros(r1 - r0, layout.shape[1], dtype=layout.values.dtype)
    dense[row, col] = values
    return dense
