"""Random pruning: a seeded uniform score, the floor every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsecraft.methods.base import LayerStats, prune_by_score
from sparsecraft.patterns import Pattern, Scope


@dataclass(frozen=True)
class Random:
    scope: Scope = "row"
    needs: ClassVar[tuple[str, ...]] = ()

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        score = torch.rand(weight.shape, generator=generator)  # (out, in) on CPU: same mask on every device
        return prune_by_score(weight, score, sparsity, pattern, self.scope)
