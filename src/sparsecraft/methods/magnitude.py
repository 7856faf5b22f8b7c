"""Magnitude pruning: score = |W|, by default compared across the whole layer (Han et al., 2015)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsecraft.methods.base import LayerStats, prune_by_score
from sparsecraft.patterns import Pattern, Scope


@dataclass(frozen=True)
class Magnitude:
    scope: Scope = "tensor"  # the usual per-layer baseline; "row" compares within each output row
    needs: ClassVar[tuple[str, ...]] = ()

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return prune_by_score(weight, weight.abs(), sparsity, pattern, self.scope)
