"""Sparsity patterns as values, and the one function that turns scores into a keep-mask.

Conventions (see docs/architecture.md):
- a mask is a ``torch.bool`` tensor called ``keep``: True = the weight is kept;
- ``sparsity`` is the fraction of zeros, in [0, 1);
- a weight has shape (out_features, in_features); N:M groups and the ``"row"`` scope run along the
  input (reduction) dimension, i.e. along a row.

Counting rule (what makes the realized sparsity exact): a tensor with U units (elements, or blocks for
``Block``) at sparsity s loses exactly ``round(s * U)`` units. When the comparison groups are rows, that
total is split over the rows by cumulative rounding, so every row loses floor or ceil of ``s * row_units``
and the tensor as a whole loses exactly ``round(s * U)``. N:M ignores ``s``: it keeps n in every m.
Ties are broken deterministically: among equal scores the unit with the lower index is pruned first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Union

import torch

Scope = Literal["row", "tensor"]


@dataclass(frozen=True)
class Unstructured:
    """Any element may be pruned."""

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    """Keep ``n`` nonzeros in every group of ``m`` consecutive weights along the input dimension."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 1 or not 0 < self.n <= self.m:
            raise ValueError(
                f"invalid N:M pattern {self.n}:{self.m}: need integers with 0 < n <= m (n = weights KEPT per group "
                f"of m), e.g. '2:4' or '4:8'"
            )

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Block:
    """Prune whole ``rows x cols`` tiles of the weight (rows along the output dim, cols along the input dim)."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if not (isinstance(self.rows, int) and isinstance(self.cols, int)) or self.rows < 1 or self.cols < 1:
            raise ValueError(f"invalid block pattern {self.rows}x{self.cols}: need positive integers, e.g. '4x4'")

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


Pattern = Union[Unstructured, NM, Block]


def parse_pattern(spec: str | Pattern) -> Pattern:
    """``"unstructured"`` -> Unstructured(), ``"2:4"`` -> NM(2, 4), ``"4x4"`` -> Block(4, 4)."""
    if isinstance(spec, (Unstructured, NM, Block)):
        return spec
    text = str(spec).strip().lower()
    if text in ("unstructured", "u", "none", ""):
        return Unstructured()
    if m := re.fullmatch(r"(\d+):(\d+)", text):
        return NM(int(m.group(1)), int(m.group(2)))
    if m := re.fullmatch(r"(\d+)x(\d+)", text):
        return Block(int(m.group(1)), int(m.group(2)))
    raise ValueError(
        f"unknown sparsity pattern {spec!r}: use 'unstructured', an N:M pattern such as '2:4' or '4:8' "
        f"(n kept per group of m), or a block pattern such as '4x4' or '1x4' (rows x cols)"
    )


def check_sparsity(sparsity: float) -> float:
    """Validate a sparsity value and return it as a float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(
            f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity}; "
            f"for 50% pass 0.5, not 50"
        )
    return float(sparsity)


def resolve_sparsity(sparsity: float | None, pattern: Pattern) -> float:
    """The sparsity a (sparsity, pattern) pair really means; N:M fixes it at 1 - n/m."""
    if isinstance(pattern, NM):
        if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-9:
            raise ValueError(
                f"pattern {pattern} fixes the sparsity at {pattern.sparsity:g}, but sparsity={sparsity:g} was "
                f"asked; drop the sparsity argument or pass {pattern.sparsity:g}"
            )
        return pattern.sparsity
    if sparsity is None:
        raise ValueError(f"pattern {pattern} needs a sparsity in [0, 1), e.g. sparsity=0.5")
    return check_sparsity(sparsity)


def check_shape(shape: tuple[int, ...], pattern: Pattern, where: str = "weight") -> None:
    """Raise if a 2-D weight of ``shape`` cannot carry ``pattern``."""
    if len(shape) != 2:
        raise ValueError(f"{where}: expected a 2-D (out_features, in_features) weight, got shape {tuple(shape)}")
    rows, cols = shape
    if isinstance(pattern, NM) and cols % pattern.m:
        raise ValueError(
            f"{where}: N:M pattern {pattern} needs the input width ({cols}) to be a multiple of m={pattern.m}; "
            f"use another m or exclude this layer"
        )
    if isinstance(pattern, Block) and (rows % pattern.rows or cols % pattern.cols):
        raise ValueError(
            f"{where}: block pattern {pattern} needs the shape {rows}x{cols} to be divisible by the block; "
            f"use a smaller block or exclude this layer"
        )


def num_pruned(units: int, sparsity: float) -> int:
    """Number of units removed at ``sparsity``: round half up, so 0.5 of 5 prunes 3."""
    return int(math.floor(sparsity * units + 0.5))


def split_counts(total_units: int, groups: int, sparsity: float) -> torch.Tensor:
    """Prune counts per group (each of ``total_units // groups`` units) summing to ``num_pruned(total_units)``.

    Cumulative rounding: group g removes round(s * end_g) - round(s * start_g) units.
    """
    per = total_units // groups
    edges = [num_pruned(per * g, sparsity) for g in range(groups + 1)]
    return torch.tensor([edges[g + 1] - edges[g] for g in range(groups)], dtype=torch.long)


def prune_lowest(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """score (G, U); counts (G,) -> keep (G, U) with the ``counts[g]`` lowest scores of row g set False."""
    order = torch.sort(score, dim=1, stable=True).indices  # (G, U), ascending, ties keep index order
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1]).expand_as(order).contiguous())  # rank of each unit
    return rank >= counts.unsqueeze(1)


def topk_mask(
    score: torch.Tensor,
    sparsity: float | None,
    pattern: Pattern | str = Unstructured(),
    scope: Scope = "row",
) -> torch.Tensor:
    """Scores (out, in), higher = keep -> keep-mask (out, in) with exactly the counted number of zeros.

    ``scope`` picks the comparison group for unstructured and block patterns: ``"row"`` compares within each
    output row (block-row for blocks), ``"tensor"`` across the whole tensor. N:M always compares within its
    group of m. Pure: ``score`` is not modified.
    """
    pattern = parse_pattern(pattern)
    sparsity = resolve_sparsity(sparsity, pattern)
    check_shape(tuple(score.shape), pattern, "scores")
    if scope not in ("row", "tensor"):
        raise ValueError(f"scope must be 'row' or 'tensor', got {scope!r}")
    if torch.isnan(score).any():
        raise ValueError("scores contain NaN; check the weights and calibration activations for NaN/inf")
    s = score.detach().float()
    rows, cols = s.shape
    if isinstance(pattern, NM):
        groups = s.reshape(rows * cols // pattern.m, pattern.m)  # (G, m)
        counts = torch.full((groups.shape[0],), pattern.m - pattern.n, dtype=torch.long)
        return prune_lowest(groups, counts).reshape(rows, cols)
    if isinstance(pattern, Block):
        br, bc = pattern.rows, pattern.cols
        tiles = s.reshape(rows // br, br, cols // bc, bc).sum(dim=(1, 3))  # (rows/br, cols/bc) block scores
        keep_tiles = _mask_2d(tiles, sparsity, scope)
        return keep_tiles.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return _mask_2d(s, sparsity, scope)


def _mask_2d(s: torch.Tensor, sparsity: float, scope: Scope) -> torch.Tensor:
    rows, cols = s.shape
    if scope == "tensor":
        flat = s.reshape(1, -1)
        counts = torch.tensor([num_pruned(flat.shape[1], sparsity)])
        return prune_lowest(flat, counts).reshape(rows, cols)
    return prune_lowest(s, split_counts(rows * cols, rows, sparsity))


def expected_zeros(shape: tuple[int, int], sparsity: float | None, pattern: Pattern | str) -> int:
    """How many zeros ``topk_mask`` produces for a weight of ``shape`` (both scopes give the same count)."""
    pattern = parse_pattern(pattern)
    sparsity = resolve_sparsity(sparsity, pattern)
    rows, cols = shape
    if isinstance(pattern, NM):
        return rows * cols // pattern.m * (pattern.m - pattern.n)
    if isinstance(pattern, Block):
        return num_pruned(rows * cols // (pattern.rows * pattern.cols), sparsity) * pattern.rows * pattern.cols
    return num_pruned(rows * cols, sparsity)


def satisfies(keep: torch.Tensor, pattern: Pattern | str) -> bool:
    """True if ``keep`` is a valid mask of ``pattern`` (N:M: at most n kept per group; Block: whole tiles)."""
    pattern = parse_pattern(pattern)
    rows, cols = keep.shape
    if isinstance(pattern, NM):
        if cols % pattern.m:
            return False
        return bool((keep.reshape(-1, pattern.m).sum(1) <= pattern.n).all())
    if isinstance(pattern, Block):
        br, bc = pattern.rows, pattern.cols
        if rows % br or cols % bc:
            return False
        tiles = keep.reshape(rows // br, br, cols // bc, bc)
        return bool((tiles.all(dim=(1, 3)) | ~tiles.any(dim=(1, 3))).all())
    return True
