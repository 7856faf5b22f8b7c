"""Block sparsity as kept r x c tiles + a tile bitmask.

Layout (see docs/formats.md): the weight is cut into a (rows / r) x (cols / c) grid of r x c tiles; ``tiles``
(T, r, c) holds the kept tiles in row-major grid order and ``tile_mask`` uint8 (rows / r, ceil((cols / c) / 8))
has one bit per tile in the bitmask's bit order, pad bits 0.
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
from sparsecraft.kernels.layout import Layout, layout_from_kept, pack_bits, pad_bits_clear, popcount_rows, unpack_bits
from sparsecraft.patterns import Block, satisfies

NAME = "sparsecraft.block.v1"
KEYS = {"format", "shape", "pattern", "tiles", "tile_mask"}


@dataclass(frozen=True)
class BlockPacked:
    tiles: torch.Tensor  # (T, r, c) weight dtype
    tile_mask: torch.Tensor  # (rows / r, ceil((cols / c) / 8)) uint8
    shape: tuple[int, int]
    pattern: Block

    @staticmethod
    def from_kept(keep: torch.Tensor, values: torch.Tensor, pattern: Block) -> "BlockPacked":
        """keep (rows, cols) bool made of whole r x c tiles, and its kept values (nnz,) row-major."""
        if not satisfies(keep, pattern):
            raise ValueError(
                f"keep mask does not satisfy block pattern {pattern}: some {pattern} tile is partly kept; "
                f"build the mask with topk_mask(score, sparsity, '{pattern}')"
            )
        rows, cols = keep.shape
        r, c = pattern.rows, pattern.cols
        tile_keep = keep.reshape(rows // r, r, cols // c, c)[:, 0, :, 0]  # (R, C)
        per_tile_row = tile_keep.sum(1).tolist()  # kept tiles in each tile-row
        parts, start = [], 0
        for k in per_tile_row:  # a tile-row's values, row-major: (r, k, c) -> its tiles (k, r, c)
            parts.append(values[start : start + r * k * c].reshape(r, k, c).permute(1, 0, 2))
            start += r * k * c
        tiles = torch.cat(parts) if parts else values.reshape(0, r, c)
        return BlockPacked(tiles.contiguous(), pack_bits(tile_keep), (rows, cols), pattern)

    @staticmethod
    def pack(weight: torch.Tensor, keep: torch.Tensor, pattern: Block) -> "BlockPacked":
        return BlockPacked.from_kept(keep, weight[keep], pattern)

    def _tile_keep(self) -> torch.Tensor:
        return unpack_bits(self.tile_mask, self.shape[1] // self.pattern.cols)  # (R, C) bool

    def keep(self) -> torch.Tensor:
        r, c = self.pattern.rows, self.pattern.cols
        return self._tile_keep().repeat_interleave(r, 0).repeat_interleave(c, 1)

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> keep (rows, cols) bool, kept values (nnz,) row-major (tile-row by tile-row, no dense weight)."""
        parts, start = [], 0
        for k in self._tile_keep().sum(1).tolist():
            parts.append(self.tiles[start : start + k].permute(1, 0, 2).reshape(-1))  # (r, k, c) row-major
            start += k
        values = torch.cat(parts) if parts else self.tiles.reshape(-1)
        return self.keep(), values

    def to_dense(self) -> torch.Tensor:
        return dense_from_kept(*self.kept())

    def to_layout(self, kind: str = "auto") -> Layout:
        return layout_from_kept(*self.kept(), kind)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "format": encode_name(NAME),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "pattern": torch.tensor([self.pattern.rows, self.pattern.cols], dtype=torch.int64),
            "tiles": self.tiles,
            "tile_mask": self.tile_mask,
        }

    @staticmethod
    def from_tensors(d: dict[str, torch.Tensor], name: str = "weight",
                     expected: tuple[int, int] | None = None) -> "BlockPacked":
        """Validated: exact entries, dtypes, shapes, tile grid, pad bits 0, set bits == number of tiles."""
        expect_keys(d, KEYS, set(), name)
        rows, cols = read_pair(d["shape"], f"{name}_shape")
        check_shape((rows, cols), expected, f"{name}_shape")
        r, c = read_pair(d["pattern"], f"{name}_pattern")
        if rows % r or cols % c:
            fail(f"{name}_pattern", f"tiles {r}x{c} do not divide the shape {rows}x{cols}")
        grid_cols = cols // c
        expect(d["tile_mask"], f"{name}_tile_mask", (torch.uint8,), (rows // r, (grid_cols + 7) // 8))
        if not pad_bits_clear(d["tile_mask"], grid_cols):
            fail(f"{name}_tile_mask", f"bits are set past tile column {grid_cols}")
        kept = int(popcount_rows(d["tile_mask"]).sum())
        expect(d["tiles"], f"{name}_tiles", FLOAT_DTYPES, (kept, r, c))
        return BlockPacked(d["tiles"], d["tile_mask"], (rows, cols), Block(r, c))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
