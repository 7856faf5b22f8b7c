"""What every method receives and returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from sparsecraft.patterns import NM, Block, Pattern, Scope, Unstructured, topk_mask

ALL_PATTERNS: tuple[type, ...] = (Unstructured, NM, Block)


@dataclass(frozen=True)
class LayerStats:
    """Calibration statistics of one layer's input (None when nobody asked for them)."""

    sqnorm: torch.Tensor | None = None  # (in,) mean over tokens of x_j^2
    hessian: torch.Tensor | None = None  # (in, in) 2/N X^T X, float32


class Method(Protocol):
    needs: ClassVar[tuple[str, ...]]  # subset of ("sqnorm", "hessian")
    # optional: supports: ClassVar[tuple[type, ...]] = pattern classes it can produce (default: ALL_PATTERNS)

    def prune(
        self,
        weight: torch.Tensor,  # (out, in)
        stats: LayerStats,
        sparsity: float,
        pattern: Pattern,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (new weight (out, in), keep (out, in) bool)
        ...


def prune_by_score(weight: torch.Tensor, score: torch.Tensor, sparsity: float, pattern: Pattern, scope: Scope):
    """Shared tail of score methods: mask the lowest scores, zero them in a copy of the weight."""
    keep = topk_mask(score, sparsity, pattern, scope)
    return weight * keep, keep


def supports(method: object, pattern: Pattern) -> bool:
    """Whether ``method`` can produce ``pattern`` (methods declare ``supports``; default: every pattern)."""
    return isinstance(pattern, getattr(method, "supports", ALL_PATTERNS))
