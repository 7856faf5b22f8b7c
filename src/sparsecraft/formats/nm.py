"""N:M sparsity as packed kept values + per-slot positions.

Layout (see docs/formats.md): each row of width ``cols`` has G = cols / m groups, each with n slots.
``values`` (rows, G * n) holds the kept weights of each group in increasing position order; ``index`` is a
flat little-endian bit stream of the position (0..m-1) of every slot, ``ceil(log2 m)`` bits each (2:4: 4 bits
per group, 1 bit per weight). A group with fewer than n kept weights fills its spare slots with value 0 at
the lowest pruned positions, and then ``slot_keep`` (a bitmask over the slots, rows x ceil(G * n / 8)) says
which slots are real; it is absent when every group keeps exactly n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsecraft.formats.bits import encode_name, pack_bits, pack_uints, unpack_bits, unpack_uints
from sparsecraft.patterns import NM

NAME = "sparsecraft.nm.v1"


def index_width(m: int) -> int:
    """Bits per slot position: ceil(log2 m), at least 1."""
    return max(1, math.ceil(math.log2(m)))


@dataclass(frozen=True)
class NMPacked:
    values: torch.Tensor  # (rows, G * n) weight dtype
    index: torch.Tensor  # (ceil(rows * G * n * width / 8),) uint8 bit stream
    slot_keep: torch.Tensor | None  # (rows, ceil(G * n / 8)) uint8, or None when every group keeps n
    shape: tuple[int, int]
    pattern: NM

    @staticmethod
    def pack(weight: torch.Tensor, keep: torch.Tensor, pattern: NM) -> "NMPacked":
        rows, cols = weight.shape
        n, m = pattern.n, pattern.m
        groups = keep.reshape(rows, cols // m, m)  # (R, G, m)
        if groups.numel() and int(groups.sum(-1).max()) > n:
            raise ValueError(
                f"keep mask does not satisfy {pattern}: some group of {m} keeps more than {n} weights; "
                f"build the mask with topk_mask(score, None, '{pattern}')"
            )
        pos = torch.arange(m).expand_as(groups)  # (R, G, m)
        order = torch.argsort((~groups).to(torch.int64) * m + pos, dim=-1)[..., :n]  # kept first, then pruned
        valid = torch.gather(groups, -1, order)  # (R, G, n)
        vals = torch.gather(weight.reshape(rows, cols // m, m), -1, order)
        vals = torch.where(valid, vals, torch.zeros((), dtype=weight.dtype))
        slot_keep = None if bool(valid.all()) else pack_bits(valid.reshape(rows, -1))
        index = pack_uints(order.reshape(-1), index_width(m))
        return NMPacked(vals.reshape(rows, -1).contiguous(), index, slot_keep, (rows, cols), pattern)

    def _slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> position (R, G, n) int64 and validity (R, G, n) bool of every slot."""
        rows, cols = self.shape
        n, m = self.pattern.n, self.pattern.m
        count = rows * (cols // m) * n
        pos = unpack_uints(self.index, count, index_width(m)).reshape(rows, cols // m, n)
        if self.slot_keep is None:
            return pos, torch.ones_like(pos, dtype=torch.bool)
        return pos, unpack_bits(self.slot_keep, (cols // m) * n).reshape(rows, cols // m, n)

    def keep(self) -> torch.Tensor:
        rows, cols = self.shape
        pos, valid = self._slots()
        keep = torch.zeros(rows, cols // self.pattern.m, self.pattern.m, dtype=torch.bool)
        return keep.scatter_(-1, pos, valid).reshape(rows, cols)

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        pos, _ = self._slots()
        dense = torch.zeros(rows, cols // self.pattern.m, self.pattern.m, dtype=self.values.dtype)
        vals = self.values.reshape(pos.shape)  # spare slots hold 0 at distinct pruned positions
        return dense.scatter_(-1, pos, vals).reshape(rows, cols)

    def tensors(self) -> dict[str, torch.Tensor]:
        d = {
            "format": encode_name(NAME),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "pattern": torch.tensor([self.pattern.n, self.pattern.m], dtype=torch.int64),
            "values": self.values,
            "index": self.index,
        }
        if self.slot_keep is not None:
            d["slot_keep"] = self.slot_keep
        return d

    @staticmethod
    def from_tensors(d: dict[str, torch.Tensor]) -> "NMPacked":
        rows, cols = (int(v) for v in d["shape"].tolist())
        n, m = (int(v) for v in d["pattern"].tolist())
        packed = NMPacked(d["values"], d["index"], d.get("slot_keep"), (rows, cols), NM(n, m))
        if packed.values.shape != (rows, cols // m * n) or cols % m:
            raise ValueError(f"nm format: values shape {tuple(packed.values.shape)} does not fit {rows}x{cols} at {n}:{m}")
        return packed

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
