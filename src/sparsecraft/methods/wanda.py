"""Wanda: score_ij = |W_ij| * ||X_j||_2, compared per output row (Sun et al., 2023, arXiv:2306.11695)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsecraft.methods.base import LayerStats, prune_by_score
from sparsecraft.patterns import Pattern, Scope, Unstructured, resolve_sparsity, split_counts


def wanda_score(weight: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """weight (out, in), sqnorm (in,) mean of x_j^2 -> score (out, in), float32.

    The mean differs from the paper's sum by a constant factor N, which does not change any comparison.
    """
    # |w| stays in the weight's dtype; the product promotes to float32 in the same op (bf16 -> f32 is exact)
    return weight.abs() * sqnorm.to(weight.device, torch.float32).sqrt().unsqueeze(0)


def keep_above_kth(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """score (G, U) float; counts (G,) -> keep (G, U) with the ``counts[g]`` lowest scores of row g False.

    The same mask as ``patterns.prune_lowest`` (a stable sort: among equal scores the leftmost go first) from a
    selection instead of a sort: the counts[g]-th smallest value v_g of each row, keep = score > v_g. Only rows
    where scores equal to v_g straddle the cut (ties) are fixed up, leftmost first. NaN scores raise.
    """
    G, U = score.shape
    k = counts.to(score.device).unsqueeze(1)  # (G, 1)
    kmin, kmax = int(counts.min()), int(counts.max())
    if kmax == 0:
        return torch.ones_like(score, dtype=torch.bool)
    if kmin == kmax:
        v = torch.kthvalue(score, kmax, dim=1, keepdim=True).values  # (G, 1)
    else:  # counts differ by one between rows (cumulative rounding): the two thresholds from one selection
        low = torch.topk(score, kmax, dim=1, largest=False, sorted=True).values  # (G, kmax) ascending
        v = low.gather(1, (k - 1).clamp(min=0))
        v = torch.where(k == 0, torch.full_like(v, float("-inf")), v)
    keep = score > v  # (G, U)
    if torch.isnan(score.amax()):  # amax propagates NaN: one reduction instead of isnan + any
        raise ValueError("scores contain NaN; check the weights and calibration activations for NaN/inf")
    off = (U - keep.sum(1, keepdim=True)) != k  # (G, 1) rows whose ties at v straddle the cut
    if off.any():
        rows = off.squeeze(1).nonzero().squeeze(1)
        s = score[rows]
        below = s < v[rows]
        tie = s == v[rows]
        need = k[rows] - below.sum(1, keepdim=True)  # ties to prune in each row, leftmost first
        keep[rows] = ~(below | (tie & (tie.cumsum(1) <= need)))
    return keep


@dataclass(frozen=True)
class Wanda:
    scope: Scope = "row"  # the paper's comparison group: each output row
    needs: ClassVar[tuple[str, ...]] = ("sqnorm",)

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if stats.sqnorm is None:
            raise ValueError("wanda needs calibration statistics (input norms); pass calibration data")
        score = wanda_score(weight, stats.sqnorm)  # (out, in)
        if isinstance(pattern, Unstructured) and self.scope == "row":  # the common case: a selection, no sort
            rows, cols = score.shape
            keep = keep_above_kth(score, split_counts(rows * cols, rows, resolve_sparsity(sparsity, pattern)))
            return weight * keep, keep
        return prune_by_score(weight, score, sparsity, pattern, self.scope)
