"""N:M sparsity as packed kept values + per-slot positions.

Layout (see docs/formats.md): each row of width ``cols`` has G = cols / m groups, each with n slots.
``values`` (rows, G * n) holds the kept weights of each group in increasing position order; ``index`` is a
flat little-endian bit stream of the position (0..m-1) of every slot, ``ceil(log2 m)`` bits each (2:4: 4 bits
per group, 1 bit per weight). A group with fewer than n kept weights fills its spare slots with value 0 at
the lowest pruned positions, and then ``slot_keep`` (a bitmask over the slots, rows x ceil(G * n / 8)) says
which slots are real; it is absent when every group keeps exactly n. This encoding is canonical: a reader
re-encodes what it decoded and refuses any file that differs.
"""

from __future__ import annotations

import math
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
    pack_uints,
    read_pair,
    unpack_uints,
)
from sparsecraft.kernels.layout import Layout, layout_from_kept, pack_bits, unpack_bits
from sparsecraft.patterns import NM

NAME = "sparsecraft.nm.v1"
KEYS = {"format", "shape", "pattern", "values", "index"}


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
    def from_kept(keep: torch.Tensor, values: torch.Tensor, pattern: NM) -> "NMPacked":
        """keep (rows, cols) bool with at most n kept per group of m, and its kept values (nnz,) row-major."""
        rows, cols = keep.shape
        n, m = pattern.n, pattern.m
        groups = keep.reshape(rows, cols // m, m)  # (R, G, m)
        if groups.numel() and int(groups.sum(-1).max()) > n:
            raise ValueError(
                f"keep mask does not satisfy {pattern}: some group of {m} keeps more than {n} weights; "
                f"build the mask with topk_mask(score, None, '{pattern}')"
            )
        pos = torch.arange(m).expand_as(groups)  # (R, G, m)
        order = torch.argsort((~groups).to(torch.int64) * m + pos, dim=-1)[..., :n]  # kept first, then pruned
        valid = torch.gather(groups, -1, order)  # (R, G, n); valid slots in row-major order = kept order
        vals = torch.zeros(valid.shape, dtype=values.dtype)
        vals[valid] = values
        slot_keep = None if bool(valid.all()) else pack_bits(valid.reshape(rows, -1))
        index = pack_uints(order.reshape(-1), index_width(m))
        return NMPacked(vals.reshape(rows, -1).contiguous(), index, slot_keep, (rows, cols), pattern)

    @staticmethod
    def pack(weight: torch.Tensor, keep: torch.Tensor, pattern: NM) -> "NMPacked":
        return NMPacked.from_kept(keep, weight[keep], pattern)

    def _slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> position (R, G, n) int64 and validity (R, G, n) bool of every slot."""
        rows, cols = self.shape
        n, m = self.pattern.n, self.pattern.m
        count = rows * (cols // m) * n
        pos = unpack_uints(self.index, count, index_width(m)).reshape(rows, cols // m, n)
        if self.slot_keep is None:
            return pos, torch.ones_like(pos, dtype=torch.bool)
        return pos, unpack_bits(self.slot_keep, (cols // m) * n).reshape(rows, cols // m, n)

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> keep (rows, cols) bool, kept values (nnz,) row-major."""
        rows, cols = self.shape
        pos, valid = self._slots()
        keep = torch.zeros(rows, cols // self.pattern.m, self.pattern.m, dtype=torch.bool)
        keep.scatter_(-1, pos, valid)
        return keep.reshape(rows, cols), self.values.reshape(valid.shape)[valid]

    def keep(self) -> torch.Tensor:
        return self.kept()[0]

    def to_dense(self) -> torch.Tensor:
        return dense_from_kept(*self.kept())

    def to_layout(self, kind: str = "auto") -> Layout:
        return layout_from_kept(*self.kept(), kind)

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
    def from_tensors(d: dict[str, torch.Tensor], name: str = "weight",
                     expected: tuple[int, int] | None = None) -> "NMPacked":
        """Validated: exact entries, dtypes, shapes, positions distinct and below m, canonical encoding."""
        expect_keys(d, KEYS, {"slot_keep"}, name)
        rows, cols = read_pair(d["shape"], f"{name}_shape")
        check_shape((rows, cols), expected, f"{name}_shape")
        n, m = read_pair(d["pattern"], f"{name}_pattern")
        if not (n < m <= cols and cols % m == 0):
            fail(f"{name}_pattern", f"{n}:{m} needs n < m and m dividing the width {cols}")
        slots = (cols // m) * n
        expect(d["values"], f"{name}_values", FLOAT_DTYPES, (rows, slots))
        expect(d["index"], f"{name}_index", (torch.uint8,), ((rows * slots * index_width(m) + 7) // 8,))
        if "slot_keep" in d:
            expect(d["slot_keep"], f"{name}_slot_keep", (torch.uint8,), (rows, (slots + 7) // 8))
        packed = NMPacked(d["values"], d["index"], d.get("slot_keep"), (rows, cols), NM(n, m))
        pos, _ = packed._slots()
        if pos.numel() and int(pos.max()) >= m:
            fail(f"{name}_index", f"a slot position is >= m = {m}")
        if n > 1 and bool((pos.sort(-1).values.diff(dim=-1) == 0).any()):
            fail(f"{name}_index", "two slots of a group hold the same position")
        again = NMPacked.from_kept(*packed.kept(), packed.pattern)
        if not _same(again, packed):
            fail(name, "the N:M encoding is not canonical (slot order, spare slots or slot_keep differ)")
        return packed

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _same(a: NMPacked, b: NMPacked) -> bool:
    if (a.slot_keep is None) != (b.slot_keep is None):
        return False
    slots_equal = a.slot_keep is None or torch.equal(a.slot_keep, b.slot_keep)
    # Bit-exact comparison of the values (torch.equal would call -0.0 == 0.0 and NaN != NaN).
    values_equal = torch.equal(a.values.view(torch.int16 if a.values.element_size() == 2 else torch.int32),
                               b.values.view(torch.int16 if b.values.element_size() == 2 else torch.int32))
    return slots_equal and values_equal and torch.equal(a.index, b.index)
