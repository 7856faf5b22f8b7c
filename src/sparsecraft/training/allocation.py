"""Layer allocations for training: global sparsity -> dict[fqn, sparsity] hitting the global target exactly.

Every allocation returns per-layer sparsities of the form ``zeros_l / numel_l`` with integer ``zeros_l`` that
sum to ``num_pruned(sum numel_l, target)``: feeding them to ``topk_mask`` prunes exactly the planned total.

- ``uniform``: every layer at the target (rounding per layer, then fixed up so the total is exact);
- ``erk``: Erdos-Renyi-Kernel (Evci et al. 2020, RigL, Appendix; from Mocanu et al. 2018's Erdos-Renyi):
  density_l proportional to sum(shape_l) / prod(shape_l), scaled to the global density; layers whose density
  would exceed 1 are made dense and the rest re-solved;
- ``global_magnitude``: one threshold on |w| over all layers (scores ranked across the whole model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from sparsecraft.patterns import check_sparsity, num_pruned, topk_mask

AllocationKind = Literal["uniform", "erk", "global_magnitude"]


def _exact_counts(target_zeros: float | Mapping[str, float], numel: Mapping[str, int], total: int) -> dict[str, int]:
    """Integer zeros per layer, each floor/ceil of its real-valued share, summing exactly to ``total``
    (largest remainder), each in [0, numel - 1] so no layer is emptied."""
    real = dict(target_zeros) if isinstance(target_zeros, Mapping) else {k: target_zeros * n for k, n in numel.items()}
    counts = {k: min(int(math.floor(v)), numel[k] - 1) for k, v in real.items()}
    short = total - sum(counts.values())
    order = sorted(real, key=lambda k: (-(real[k] - math.floor(real[k])), k))
    while short > 0:
        grew = False
        for k in order:
            if short and counts[k] < numel[k] - 1:
                counts[k] += 1
                short -= 1
                grew = True
        if not grew:
            raise ValueError("target sparsity too high to leave at least one weight in every layer")
    return counts


def _to_sparsity(counts: Mapping[str, int], numel: Mapping[str, int]) -> dict[str, float]:
    return {k: counts[k] / numel[k] for k in numel}


def uniform(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    """Every layer at ``sparsity`` (up to one weight per layer, so that the total is exact)."""
    sparsity = check_sparsity(sparsity)
    numel = {k: math.prod(s) for k, s in shapes.items()}
    total = num_pruned(sum(numel.values()), sparsity)
    return _to_sparsity(_exact_counts(sparsity, numel, total), numel)


def erk(shapes: Mapping[str, tuple[int, ...]], sparsity: float, power: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel allocation; ``power`` scales the raw ERK score (1.0 = the paper)."""
    sparsity = check_sparsity(sparsity)
    numel = {k: math.prod(s) for k, s in shapes.items()}
    n_total = sum(numel.values())
    keep_total = n_total - num_pruned(n_total, sparsity)
    raw = {k: (sum(s) / math.prod(s)) ** power for k, s in shapes.items()}
    dense: set[str] = set()
    while len(dense) < len(numel):  # solve eps * sum_{l not dense} raw_l * n_l = keep_total - sum_{l dense} n_l
        free = keep_total - sum(numel[k] for k in dense)
        eps = free / sum(raw[k] * numel[k] for k in numel if k not in dense)
        over = {k for k in numel if k not in dense and eps * raw[k] >= 1.0}
        if not over:
            break
        dense |= over
    density = {k: 1.0 if k in dense else eps * raw[k] for k in numel}  # all dense only when sparsity ~ 0
    zeros = {k: (1.0 - density[k]) * numel[k] for k in numel}
    return _to_sparsity(_exact_counts(zeros, numel, n_total - keep_total), numel)


def global_magnitude(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    """One magnitude threshold across all layers: the per-layer sparsities it implies. A layer the threshold
    would empty keeps its single largest weight and the threshold is re-solved over the others."""
    sparsity = check_sparsity(sparsity)
    numel = {k: w.numel() for k, w in weights.items()}
    zeros_left = num_pruned(sum(numel.values()), sparsity)
    counts: dict[str, int] = {}
    while True:
        names = [k for k in weights if k not in counts]
        flat = torch.cat([weights[k].detach().abs().float().reshape(-1).cpu() for k in names])  # (N,)
        s = min(zeros_left / flat.numel(), 1.0 - 0.5 / flat.numel())
        keep = topk_mask(flat.unsqueeze(0), s, scope="tensor").squeeze(0)  # exact count, ties by index
        zeros = dict(zip(names, (int((~part).sum()) for part in keep.split([numel[k] for k in names]))))
        full = [k for k in names if zeros[k] >= numel[k]]
        if not full:
            counts.update(zeros)
            return {k: counts[k] / numel[k] for k in weights}
        for k in full:
            counts[k] = numel[k] - 1
            zeros_left -= numel[k] - 1


def allocate(
    kind: AllocationKind, weights: Mapping[str, torch.Tensor], sparsity: float
) -> dict[str, float]:
    """Dispatch by name; ``weights`` gives shapes (and magnitudes for ``global_magnitude``)."""
    shapes = {k: tuple(w.shape) for k, w in weights.items()}
    if kind == "uniform":
        return uniform(shapes, sparsity)
    if kind == "erk":
        return erk(shapes, sparsity)
    if kind == "global_magnitude":
        return global_magnitude(weights, sparsity)
    raise ValueError(f"unknown allocation {kind!r}: use one of 'uniform', 'erk', 'global_magnitude'")


def realized_zeros(sparsities: Mapping[str, float], numel: Mapping[str, int]) -> int:
    """Total zeros ``topk_mask`` will produce for these per-layer sparsities."""
    return sum(num_pruned(numel[k], s) for k, s in sparsities.items())
