"""RIA: relative importance and activations (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method
for Large Language Models", ICLR 2024).

    score_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * (||X_j||_2)^a

The first term compares a weight with the other weights of its output row, the second with the other weights fed
by the same input channel: a channel whose weights are all large is not wiped out as a whole (the paper's "channel
corruption"). ``a`` = 0.5 is the paper's default. Compared per output row, as Wanda.

For N:M the paper also permutes input channels so that each group of m holds a mix of strong and weak channels;
a permutation changes the function unless it is folded into the layers that produce those channels, so it is not
done inside this per-layer method: see solvers/permute.py (the permutation) and engine/permute.py (the fold into
an MLP's up/gate rows, exact, before pruning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsecraft.methods.base import LayerStats, prune_by_score
from sparsecraft.patterns import Pattern, Scope


def ria_score(weight: torch.Tensor, sqnorm: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """weight (out, in), sqnorm (in,) mean of x_j^2 -> score (out, in). Pure.

    ||X_j||_2 = sqrt(N * sqnorm_j); the constant N^(a/2) multiplies every score alike and is left out. An all-zero
    row or column contributes 0 (0 / 0 is taken as 0).
    """
    A = weight.detach().abs().float()  # (out, in)
    row = A.sum(1, keepdim=True)  # (out, 1)
    col = A.sum(0, keepdim=True)  # (1, in)
    rel = torch.where(row > 0, A / row.clamp_min(1e-30), 0.0) + torch.where(col > 0, A / col.clamp_min(1e-30), 0.0)
    return rel * sqnorm.to(weight.device).float().clamp_min(0).pow(a / 2).unsqueeze(0)


@dataclass(frozen=True)
class RIA:
    a: float = 0.5  # exponent of the activation norm
    scope: Scope = "row"
    needs: ClassVar[tuple[str, ...]] = ("sqnorm",)

    def __post_init__(self) -> None:
        if not 0 <= self.a <= 4:
            raise ValueError(f"ria exponent a must be in [0, 4] (paper default 0.5), got {self.a}")

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if stats.sqnorm is None:
            raise ValueError("ria needs calibration statistics (input norms); pass calibration data")
        return prune_by_score(weight, ria_score(weight, stats.sqnorm, self.a), sparsity, pattern, self.scope)
