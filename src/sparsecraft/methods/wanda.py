"""Wanda: score_ij = |W_ij| * ||X_j||_2, compared per output row (Sun et al., 2023, arXiv:2306.11695)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsecraft.methods.base import LayerStats, prune_by_score
from sparsecraft.patterns import Pattern, Scope


def wanda_score(weight: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """weight (out, in), sqnorm (in,) mean of x_j^2 -> score (out, in).

    The mean differs from the paper's sum by a constant factor N, which does not change any comparison.
    """
    return weight.abs().float() * sqnorm.to(weight.device).sqrt().unsqueeze(0)


@dataclass(frozen=True)
class Wanda:
    scope: Scope = "row"  # the paper's comparison group: each output row
    needs: ClassVar[tuple[str, ...]] = ("sqnorm",)

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if stats.sqnorm is None:
            raise ValueError("wanda needs calibration statistics (input norms); pass calibration data")
        return prune_by_score(weight, wanda_score(weight, stats.sqnorm), sparsity, pattern, self.scope)
