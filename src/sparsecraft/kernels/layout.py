"""Compute layouts for the CPU kernels, and THE bitmask: the bit order every sparse format and kernel shares.

The bitmask (defined once, here): bit j of byte k holds column 8k + j, little-endian inside each byte; a row of width
L takes ceil(L / 8) bytes and its pad bits are 0. The on-disk bitmask format (formats/bitmask.py) is these bytes;
the kernel layout pads each row to whole 64-bit words.

- ``BitmaskLayout``: per row, 64-bit mask words + packed kept values (row offsets, and 8 values of padding so that
  vector loads may run past the end).
- ``CsrLayout``: per row, column indices (uint16 bits in an int16 tensor when cols <= 65536) + values; for very
  sparse weights, where skipping zeros beats expanding every 8 columns.
- ``check_layout`` validates a layout before any kernel may read it (a crafted file must not reach the C++ code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Above this sparsity the CSR kernel wins at batch 1 (docs/kernels.md): bitmask work is per 8 columns whatever the
# density, CSR work is per kept weight.
CSR_MIN_SPARSITY = 0.8
# Skip all-zero mask bytes (a branch) only when zero bytes come in runs, as in block-sparse weights: then the
# branch is predictable; scattered zero bytes make it unpredictable (docs/kernels.md).
SKIP_MIN_ZERO_BYTES = 0.25
SKIP_MIN_RUN = 0.9  # P(next byte zero | this byte zero)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
VALUE_PAD = 8  # zeros after the kept values of a BitmaskLayout: vector loads may read up to 8 past the end
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool (..., L) -> uint8 (..., ceil(L / 8)) in the bitmask's bit order; pure."""
    length = bits.shape[-1]
    pad = (-length) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad))  # (..., L + pad)
    b = b.reshape(*bits.shape[:-1], (length + pad) // 8, 8)  # (..., L8, 8)
    out = torch.zeros(b.shape[:-1], dtype=torch.uint8)
    for j in range(8):
        out |= b[..., j] << j
    return out


def unpack_bits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """uint8 (..., L8) -> bool (..., length); the inverse of ``pack_bits``."""
    shifts = torch.arange(8, dtype=torch.uint8)
    b = (packed.unsqueeze(-1) >> shifts) & 1  # (..., L8, 8)
    return b.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :length].bool()


def popcount_rows(mask_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 (rows, B) -> int64 (rows,) set bits per row."""
    return _POPCOUNT[mask_bytes.to(torch.int64)].sum(1)


def pad_bits_clear(mask_bytes: torch.Tensor, length: int) -> bool:
    """True when no bit at or beyond column ``length`` is set in uint8 (rows, B) bitmask rows."""
    full, rest = divmod(length, 8)
    if rest and bool((mask_bytes[:, full] >> rest).any()):
        return False
    return not bool(mask_bytes[:, full + (1 if rest else 0):].any())


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


def _row_ptr(counts: torch.Tensor) -> torch.Tensor:
    row_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    return row_ptr


def bitmask_from_bits(mask_bytes: torch.Tensor, values: torch.Tensor, cols: int) -> BitmaskLayout:
    """The on-disk bitmask rows, uint8 (rows, ceil(cols / 8)), and the kept values (nnz,) row-major ->
    BitmaskLayout, without building the dense weight or a bool mask; pure. The caller has validated the bytes."""
    rows = mask_bytes.shape[0]
    words = (cols + 63) // 64
    padded = torch.zeros(rows, words * 8, dtype=torch.uint8)  # (rows, words * 8)
    padded[:, : mask_bytes.shape[1]] = mask_bytes
    skip = _zero_bytes_in_runs(padded)
    values = torch.cat([values.reshape(-1), torch.zeros(VALUE_PAD, dtype=values.dtype)])
    return BitmaskLayout(padded.view(torch.int64), values, _row_ptr(popcount_rows(mask_bytes)), cols, skip)


def bitmask_layout(weight: torch.Tensor, keep: torch.Tensor) -> BitmaskLayout:
    """weight (rows, cols), keep (rows, cols) bool -> BitmaskLayout; pure."""
    return bitmask_from_bits(pack_bits(keep), weight[keep], weight.shape[1])


def _zero_bytes_in_runs(mask_bytes: torch.Tensor) -> bool:
    zero = (mask_bytes == 0).reshape(-1)  # (rows * words * 8,)
    if zero.numel() < 2 or float(zero.float().mean()) < SKIP_MIN_ZERO_BYTES:
        return False
    run = (zero[1:] & zero[:-1]).sum() / zero[:-1].sum().clamp(min=1)
    return bool(run >= SKIP_MIN_RUN)


def csr_from_kept(keep: torch.Tensor, values: torch.Tensor) -> CsrLayout:
    """keep (rows, cols) bool and its kept values (nnz,) row-major -> CsrLayout; pure."""
    cols = keep.shape[1]
    col = keep.nonzero()[:, 1]  # (nnz,) row-major
    col = col.to(torch.int32).to(torch.int16) if cols <= 65536 else col.to(torch.int32)  # int16 keeps uint16 bits
    return CsrLayout(col.contiguous(), values.reshape(-1).contiguous(), _row_ptr(keep.sum(1)), cols)


def csr_layout(weight: torch.Tensor, keep: torch.Tensor) -> CsrLayout:
    """weight (rows, cols), keep (rows, cols) bool -> CsrLayout; pure."""
    return csr_from_kept(keep, weight[keep])


def choose_kind(kind: str, nnz: int, numel: int) -> str:
    """``"bitmask"``, ``"csr"`` or ``"auto"`` (CSR from CSR_MIN_SPARSITY on) -> the layout kind to build."""
    if kind not in ("auto", "bitmask", "csr"):
        raise ValueError(f"layout kind must be 'auto', 'bitmask' or 'csr', got {kind!r}")
    if kind == "auto":
        sparsity = 1.0 - nnz / numel if numel else 0.0
        kind = "csr" if sparsity >= CSR_MIN_SPARSITY else "bitmask"
    return kind


def layout_from_kept(keep: torch.Tensor, values: torch.Tensor, kind: str = "auto") -> Layout:
    """keep (rows, cols) bool and its kept values (nnz,) row-major -> the layout ``kind`` picks; pure."""
    if choose_kind(kind, values.numel(), keep.numel()) == "csr":
        return csr_from_kept(keep, values)
    return bitmask_from_bits(pack_bits(keep), values, keep.shape[1])


def make_layout(weight: torch.Tensor, keep: torch.Tensor, kind: str = "auto") -> Layout:
    """Pick the layout for a weight: ``"bitmask"``, ``"csr"`` or ``"auto"`` (CSR above CSR_MIN_SPARSITY)."""
    return layout_from_kept(keep, weight[keep], kind)


def layout_mask_bytes(layout: BitmaskLayout) -> torch.Tensor:
    """The bitmask rows of a BitmaskLayout without the word padding: uint8 (rows, ceil(cols / 8))."""
    return layout.mask.view(torch.uint8)[:, : (layout.cols + 7) // 8]


def layout_keep(layout: Layout) -> torch.Tensor:
    """The keep-mask (rows, cols) bool a layout encodes."""
    rows, cols = layout.shape
    if isinstance(layout, CsrLayout):
        keep = torch.zeros(rows, cols, dtype=torch.bool)
        keep[_row_index(layout.row_ptr), _col_index(layout)] = True
        return keep
    return unpack_bits(layout.mask.view(torch.uint8), cols)


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


def _fail(name: str, what: str) -> None:
    raise ValueError(f"{name}: {what}; the file is corrupt or was not written by sparsecraft (re-run `sparsecraft "
                     f"pack` or `prune` to rebuild it)")


def _check_row_ptr(name: str, row_ptr: torch.Tensor, rows: int, nnz: int) -> None:
    if row_ptr.dtype != torch.int64 or row_ptr.shape != (rows + 1,):
        _fail(f"{name}.row_ptr", f"expected int64 ({rows + 1},), got {row_ptr.dtype} {tuple(row_ptr.shape)}")
    if int(row_ptr[0]) != 0 or bool((row_ptr[1:] < row_ptr[:-1]).any()) or int(row_ptr[-1]) != nnz:
        _fail(f"{name}.row_ptr", f"row offsets must start at 0, never decrease and end at the {nnz} kept values")


def check_layout(layout: Layout, name: str = "layout", shape: tuple[int, int] | None = None) -> None:
    """Raise one ValueError naming the tensor when ``layout`` is inconsistent (what the kernels would trust):
    dtypes, shapes, row offsets monotone and ending at the value count, column indices below the width, per-row
    mask popcount equal to the row's value count, no mask bit past the width. ``shape``: the expected (rows, cols)."""
    if shape is not None and tuple(layout.shape) != tuple(shape):
        _fail(name, f"shape {tuple(layout.shape)} does not match the model's weight {tuple(shape)}")
    rows, cols = layout.shape
    if not layout.values.is_floating_point() or layout.values.dim() != 1:
        _fail(f"{name}.values", f"expected a 1-D float tensor, got {layout.values.dtype} {tuple(layout.values.shape)}")
    if isinstance(layout, CsrLayout):
        nnz = layout.values.numel()
        want = torch.int16 if cols <= 65536 else torch.int32
        if layout.col.dtype != want or layout.col.shape != (nnz,):
            _fail(f"{name}.col", f"expected {want} ({nnz},), got {layout.col.dtype} {tuple(layout.col.shape)}")
        _check_row_ptr(name, layout.row_ptr, rows, nnz)
        if nnz and int(_col_index(layout).max()) >= cols:
            _fail(f"{name}.col", f"a column index is >= the width {cols}")
        return
    words = (cols + 63) // 64
    if layout.mask.dtype != torch.int64 or layout.mask.shape != (rows, words):
        _fail(f"{name}.mask", f"expected int64 ({rows}, {words}), got {layout.mask.dtype} {tuple(layout.mask.shape)}")
    nnz = layout.values.numel() - VALUE_PAD
    if nnz < 0 or bool(layout.values[nnz:].any()):
        _fail(f"{name}.values", f"must end with {VALUE_PAD} zeros of padding")
    _check_row_ptr(name, layout.row_ptr, rows, nnz)
    mask_bytes = layout.mask.view(torch.uint8)
    if not pad_bits_clear(mask_bytes, cols):
        _fail(f"{name}.mask", f"bits are set past column {cols}")
    if not torch.equal(popcount_rows(mask_bytes), layout.row_ptr[1:] - layout.row_ptr[:-1]):
        _fail(f"{name}.mask", "a row's set bits differ from its number of values in row_ptr")
