"""Packed sparse weight formats: exact, pure tensor code, safetensors-serializable.

``pack(weight, keep, pattern)`` -> a ``Packed`` object; ``from_tensors(packed.tensors())`` rebuilds it.
Formats: values + bitmask (unstructured), packed values + slot positions (N:M), kept tiles + tile bitmask
(block). See docs/formats.md for the byte layouts.
"""

from __future__ import annotations

from typing import Protocol, Union

import torch

from sparsecraft.formats.bitmask import NAME as BITMASK
from sparsecraft.formats.bitmask import BitmaskPacked
from sparsecraft.formats.bits import decode_name
from sparsecraft.formats.block import NAME as BLOCK
from sparsecraft.formats.block import BlockPacked
from sparsecraft.formats.nm import NAME as NMNAME
from sparsecraft.formats.nm import NMPacked
from sparsecraft.patterns import NM, Block, Pattern, Unstructured, check_shape, parse_pattern


class Packed(Protocol):
    """What every packed format offers."""

    shape: tuple[int, int]

    def to_dense(self) -> torch.Tensor: ...

    def keep(self) -> torch.Tensor: ...

    def tensors(self) -> dict[str, torch.Tensor]: ...

    @property
    def nbytes(self) -> int: ...


AnyPacked = Union[BitmaskPacked, NMPacked, BlockPacked]
_READERS = {BITMASK: BitmaskPacked.from_tensors, NMNAME: NMPacked.from_tensors, BLOCK: BlockPacked.from_tensors}


def pack(weight: torch.Tensor, keep: torch.Tensor, pattern: Pattern | str = Unstructured()) -> AnyPacked:
    """weight (out, in), keep (out, in) bool -> the packed format of ``pattern``; weights where keep is False
    are dropped (they unpack as 0). Pure: the inputs are not modified."""
    pattern = parse_pattern(pattern)
    if weight.dim() != 2 or keep.shape != weight.shape:
        raise ValueError(
            f"pack needs a 2-D weight (out, in) and a keep mask of the same shape; got weight "
            f"{tuple(weight.shape)} and keep {tuple(keep.shape)}"
        )
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a torch.bool mask (True = keep), got {keep.dtype}; use keep.bool()")
    check_shape(tuple(weight.shape), pattern)
    w, k = weight.detach().cpu().contiguous(), keep.cpu().contiguous()
    if isinstance(pattern, NM):
        return NMPacked.pack(w, k, pattern)
    if isinstance(pattern, Block):
        return BlockPacked.pack(w, k, pattern)
    return BitmaskPacked.pack(w, k)


def from_tensors(d: dict[str, torch.Tensor]) -> AnyPacked:
    """Rebuild a packed weight from ``Packed.tensors()`` (e.g. read back from safetensors)."""
    if "format" not in d:
        raise ValueError(f"not a packed sparsecraft weight: no 'format' entry among keys {sorted(d)}")
    name = decode_name(d["format"])
    if name not in _READERS:
        raise ValueError(f"unknown packed format {name!r}; known: {sorted(_READERS)} (upgrade sparsecraft?)")
    return _READERS[name](d)


__all__ = ["Packed", "BitmaskPacked", "NMPacked", "BlockPacked", "pack", "from_tensors"]
