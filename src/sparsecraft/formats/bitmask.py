"""Unstructured sparsity as values + bitmask.

Layout (see docs/formats.md): ``values`` (nnz,) holds the kept weights in row-major order; ``mask`` uint8
(rows, ceil(cols / 8)) holds one bit per weight in the bitmask's bit order (``sparsecraft.kernels.layout``), each
row starting on a byte, pad bits 0. At 50% in fp32 this is 0.5 * 4 + 1/8 bytes per weight = 53% of dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecraft.formats.bits import (
    FLOAT_DTYPES,
    check_shape,
    dense_from_kept,
    encode_name,
    expect,
    expect_keys,
    fail,
    read_pair,
)
from sparsecraft.kernels.layout import (
    Layout,
    bitmask_from_bits,
    choose_kind,
    csr_from_kept,
    pack_bits,
    pad_bits_clear,
    popcount_rows,
    unpack_bits,
)

NAME = "sparsecraft.bitmask.v1"
KEYS = {"format", "shape", "values", "mask"}


@dataclass(frozen=True)
class BitmaskPacked:
    values: torch.Tensor  # (nnz,) weight dtype
    mask: torch.Tensor  # (rows, ceil(cols / 8)) uint8
    shape: tuple[int, int]

    @staticmethod
    def from_kept(keep: torch.Tensor, values: torch.Tensor) -> "BitmaskPacked":
        """keep (rows, cols) bool and its kept values (nnz,) in row-major order."""
        return BitmaskPacked(values.contiguous(), pack_bits(keep), (keep.shape[0], keep.shape[1]))

    @staticmethod
    def pack(weight: torch.Tensor, keep: torch.Tensor) -> "BitmaskPacked":
        return BitmaskPacked.from_kept(keep, weight[keep])

    def keep(self) -> torch.Tensor:
        return unpack_bits(self.mask, self.shape[1])  # (rows, cols) bool

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> keep (rows, cols) bool, kept values (nnz,) row-major."""
        return self.keep(), self.values

    def to_dense(self) -> torch.Tensor:
        return dense_from_kept(*self.kept())

    def to_layout(self, kind: str = "auto") -> Layout:
        """The kernel layout, straight from the stored bytes (bitmask: no bool mask, no dense weight)."""
        if choose_kind(kind, self.values.numel(), self.shape[0] * self.shape[1]) == "csr":
            return csr_from_kept(self.keep(), self.values)
        return bitmask_from_bits(self.mask, self.values, self.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "format": encode_name(NAME),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "values": self.values,
            "mask": self.mask,
        }

    @staticmethod
    def from_tensors(d: dict[str, torch.Tensor], name: str = "weight",
                     expected: tuple[int, int] | None = None) -> "BitmaskPacked":
        """Validated: exact entries, dtypes, shapes, pad bits 0, set bits == number of values."""
        expect_keys(d, KEYS, set(), name)
        rows, cols = read_pair(d["shape"], f"{name}_shape")
        check_shape((rows, cols), expected, f"{name}_shape")
        mask = d["mask"]
        expect(mask, f"{name}_mask", (torch.uint8,), (rows, (cols + 7) // 8))
        if not pad_bits_clear(mask, cols):
            fail(f"{name}_mask", f"bits are set past column {cols}")
        nnz = int(popcount_rows(mask).sum())
        expect(d["values"], f"{name}_values", FLOAT_DTYPES, (nnz,))
        return BitmaskPacked(d["values"], mask, (rows, cols))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
