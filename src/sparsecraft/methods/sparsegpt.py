"""SparseGPT: prune with the OBS update that reconstructs the layer output (arXiv:2301.00774)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsecraft.methods.base import LayerStats
from sparsecraft.patterns import NM, Pattern, Unstructured
from sparsecraft.solvers.obs import sparsegpt_solve


@dataclass(frozen=True)
class SparseGPT:
    blocksize: int = 128  # columns solved together; the paper's default
    dampening: float = 0.01  # fraction of mean(diag H) added to the diagonal
    needs: ClassVar[tuple[str, ...]] = ("hessian",)
    supports: ClassVar[tuple[type, ...]] = (Unstructured, NM)

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise ValueError(f"sparsegpt blocksize must be >= 1, got {self.blocksize}")
        if not 0 <= self.dampening <= 10:
            raise ValueError(f"sparsegpt dampening must be in [0, 10] (typical 0.01-0.1), got {self.dampening}")

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if stats.hessian is None:
            raise ValueError("sparsegpt needs calibration statistics (the Hessian); pass calibration data")
        return sparsegpt_solve(weight, stats.hessian, sparsity, pattern, self.blocksize, self.dampening)
