"""Unstructured sparsity as values + bitmask.

Layout (see docs/formats.md): ``values`` (nnz,) holds the kept weights in row-major order; ``mask`` uint8
(rows, ceil(cols / 8)) holds one bit per weight, little-endian inside each byte, each row starting on a byte.
At 50% in fp32 this is 0.5 * 4 + 1/8 bytes per weight = 53% of dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecraft.formats.bits import encode_name, pack_bits, unpack_bits

NAME = "sparsecraft.bitmask.v1"


@dataclass(frozen=True)
class BitmaskPacked:
    values: torch.Tensor  # (nnz,) weight dtype
    mask: torch.Tensor  # (rows, ceil(cols / 8)) uint8
    shape: tuple[int, int]

    @staticmethod
    def pack(weight: torch.Tensor, keep: torch.Tensor) -> "BitmaskPacked":
        values = weight[keep].contiguous()  # (nnz,) row-major order of the kept weights
        return BitmaskPacked(values, pack_bits(keep), (weight.shape[0], weight.shape[1]))

    def keep(self) -> torch.Tensor:
        return unpack_bits(self.mask, self.shape[1])  # (rows, cols) bool

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype)
        dense[self.keep()] = self.values
        return dense

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "format": encode_name(NAME),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "values": self.values,
            "mask": self.mask,
        }

    @staticmethod
    def from_tensors(d: dict[str, torch.Tensor]) -> "BitmaskPacked":
        rows, cols = (int(v) for v in d["shape"].tolist())
        packed = BitmaskPacked(d["values"], d["mask"].to(torch.uint8), (rows, cols))
        if packed.mask.shape != (rows, (cols + 7) // 8):
            raise ValueError(f"bitmask format: mask shape {tuple(packed.mask.shape)} does not fit shape {rows}x{cols}")
        nnz = int(packed.keep().sum())
        if packed.values.shape != (nnz,):
            raise ValueError(f"bitmask format: mask keeps {nnz} weights but values has shape {tuple(d['values'].shape)}")
        return packed

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
