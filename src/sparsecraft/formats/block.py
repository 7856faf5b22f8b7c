"""Block sparsity as kept r x c tiles + a tile bitmask.

Layout (see docs/formats.md): the weight is cut into a (rows / r) x (cols / c) grid of r x c tiles; ``tiles``
(T, r, c) holds the kept tiles in row-major grid order and ``tile_mask`` uint8 (rows / r, ceil((cols / c) / 8))
has one bit per tile, little-endian inside each byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecraft.formats.bits import encode_name, pack_bits, unpack_bits
from sparsecraft.patterns import Block, satisfies

NAME = "sparsecraft.block.v1"


@dataclass(frozen=True)
class BlockPacked:
    tiles: torch.Tensor  # (T, r, c) weight dtype
    tile_mask: torch.Tensor  # (rows / r, ceil((cols / c) / 8)) uint8
    shape: tuple[int, int]
    pattern: Block

    @staticmethod
    def pack(weight: torch.Tensor, keep: torch.Tensor, pattern: Block) -> "BlockPacked":
        if not satisfies(keep, pattern):
            raise ValueError(
                f"keep mask does not satisfy block pattern {pattern}: some {pattern} tile is partly kept; "
                f"build the mask with topk_mask(score, sparsity, '{pattern}')"
            )
        rows, cols = weight.shape
        r, c = pattern.rows, pattern.cols
        grid = weight.reshape(rows // r, r, cols // c, c).permute(0, 2, 1, 3)  # (R, C, r, c)
        tile_keep = keep.reshape(rows // r, r, cols // c, c)[:, 0, :, 0]  # (R, C)
        return BlockPacked(grid[tile_keep].contiguous(), pack_bits(tile_keep), (rows, cols), pattern)

    def _tile_keep(self) -> torch.Tensor:
        return unpack_bits(self.tile_mask, self.shape[1] // self.pattern.cols)  # (R, C) bool

    def keep(self) -> torch.Tensor:
        r, c = self.pattern.rows, self.pattern.cols
        return self._tile_keep().repeat_interleave(r, 0).repeat_interleave(c, 1)

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        r, c = self.pattern.rows, self.pattern.cols
        grid = torch.zeros(rows // r, cols // c, r, c, dtype=self.tiles.dtype)
        grid[self._tile_keep()] = self.tiles
        return grid.permute(0, 2, 1, 3).reshape(rows, cols)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "format": encode_name(NAME),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "pattern": torch.tensor([self.pattern.rows, self.pattern.cols], dtype=torch.int64),
            "tiles": self.tiles,
            "tile_mask": self.tile_mask,
        }

    @staticmethod
    def from_tensors(d: dict[str, torch.Tensor]) -> "BlockPacked":
        rows, cols = (int(v) for v in d["shape"].tolist())
        r, c = (int(v) for v in d["pattern"].tolist())
        packed = BlockPacked(d["tiles"], d["tile_mask"].to(torch.uint8), (rows, cols), Block(r, c))
        kept = int(packed._tile_keep().sum())
        if packed.tiles.shape != (kept, r, c):
            raise ValueError(f"block format: tile mask keeps {kept} tiles but tiles has shape {tuple(packed.tiles.shape)}")
        return packed

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
