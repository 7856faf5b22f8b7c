"""Packed on-disk formats for pruned weights, their validation, and their direct conversion to kernel layouts.

Each format stores a weight (out, in) and its keep-mask exactly: values + bitmask (unstructured), values + slot
positions (N:M), kept tiles + tile bitmask (block). See docs/formats.md for the byte layouts.

- ``pack(weight, keep, pattern)`` / ``from_kept(keep, values, pattern)`` build one; ``.tensors()`` is what a file
  holds; ``from_tensors(d, name, expected)`` reads it back and refuses anything inconsistent with one ValueError
  naming the tensor.
- ``packed.to_layout(kind)`` gives the kernel layout and ``from_layout(layout, pattern)`` the format back, neither
  through the dense weight.
"""

from __future__ import annotations

from typing import Protocol, Union

import torch

from sparsecraft.formats.bitmask import NAME as BITMASK
from sparsecraft.formats.bitmask import BitmaskPacked
from sparsecraft.formats.bits import decode_name, fail
from sparsecraft.formats.block import NAME as BLOCK
from sparsecraft.formats.block import BlockPacked
from sparsecraft.formats.nm import NAME as NMNAME
from sparsecraft.formats.nm import NMPacked
from sparsecraft.kernels.layout import BitmaskLayout, Layout, layout_keep, layout_mask_bytes, layout_values
from sparsecraft.patterns import NM, Block, Pattern, Unstructured, check_shape, parse_pattern


class Packed(Protocol):
    """What every packed format offers."""

    shape: tuple[int, int]

    def to_dense(self) -> torch.Tensor: ...

    def keep(self) -> torch.Tensor: ...

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def to_layout(self, kind: str = "auto") -> Layout: ...

    def tensors(self) -> dict[str, torch.Tensor]: ...

    @property
    def nbytes(self) -> int: ...


AnyPacked = Union[BitmaskPacked, NMPacked, BlockPacked]
_READERS = {BITMASK: BitmaskPacked.from_tensors, NMNAME: NMPacked.from_tensors, BLOCK: BlockPacked.from_tensors}


def _check_pair(weight_or_keep_shape: tuple[int, ...], keep: torch.Tensor) -> None:
    if len(weight_or_keep_shape) != 2 or tuple(keep.shape) != tuple(weight_or_keep_shape):
        raise ValueError(
            f"pack needs a 2-D weight (out, in) and a keep mask of the same shape; got weight "
            f"{tuple(weight_or_keep_shape)} and keep {tuple(keep.shape)}"
        )
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a torch.bool mask (True = keep), got {keep.dtype}; use keep.bool()")


def from_kept(keep: torch.Tensor, values: torch.Tensor, pattern: Pattern | str = Unstructured()) -> AnyPacked:
    """keep (out, in) bool and its kept values (nnz,) in row-major order -> the packed format of ``pattern``."""
    pattern = parse_pattern(pattern)
    _check_pair(tuple(keep.shape), keep)
    check_shape(tuple(keep.shape), pattern)
    k, v = keep.cpu().contiguous(), values.detach().cpu().reshape(-1).contiguous()
    if v.numel() != int(k.sum()):
        raise ValueError(f"keep marks {int(k.sum())} weights but {v.numel()} values were given")
    if isinstance(pattern, NM):
        return NMPacked.from_kept(k, v, pattern)
    if isinstance(pattern, Block):
        return BlockPacked.from_kept(k, v, pattern)
    return BitmaskPacked.from_kept(k, v)


def pack(weight: torch.Tensor, keep: torch.Tensor, pattern: Pattern | str = Unstructured()) -> AnyPacked:
    """weight (out, in), keep (out, in) bool -> the packed format of ``pattern``; weights where keep is False
    are dropped (they unpack as 0). Pure: the inputs are not modified."""
    _check_pair(tuple(weight.shape), keep)
    w = weight.detach().cpu()
    return from_kept(keep, w[keep.cpu()], pattern)


def from_layout(layout: Layout, pattern: Pattern | str = Unstructured()) -> AnyPacked:
    """A kernel layout -> its on-disk format (bitmask layouts of unstructured weights: the same bytes, unpadded)."""
    pattern = parse_pattern(pattern)
    if isinstance(layout, BitmaskLayout) and isinstance(pattern, Unstructured):
        return BitmaskPacked(layout_values(layout).clone(), layout_mask_bytes(layout).contiguous(), layout.shape)
    return from_kept(layout_keep(layout), layout_values(layout), pattern)


def from_tensors(d: dict[str, torch.Tensor], name: str = "weight",
                 expected: tuple[int, int] | None = None) -> AnyPacked:
    """Rebuild a packed weight from ``Packed.tensors()`` (e.g. read back from safetensors), validated; ``name``
    names the tensors in errors, ``expected`` is the model's weight shape when known."""
    if "format" not in d:
        fail(name, f"no 'format' entry among {sorted(d)}")
    kind = decode_name(d["format"], f"{name}_format")
    if kind not in _READERS:
        fail(f"{name}_format", f"unknown packed format {kind!r}; known: {sorted(_READERS)} (upgrade sparsecraft?)")
    return _READERS[kind](d, name, expected)


def pattern_of(packed: AnyPacked) -> Pattern:
    return getattr(packed, "pattern", Unstructured())


__all__ = ["Packed", "AnyPacked", "BitmaskPacked", "NMPacked", "BlockPacked", "pack", "from_kept", "from_layout",
           "from_tensors", "pattern_of"]
