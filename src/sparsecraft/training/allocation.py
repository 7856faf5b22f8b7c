"""Layer allocations for training: global sparsity -> dict[fqn, sparsity] hitting the global target exactly.

Every allocation returns per-layer sparsities of the form ``zeros_l / numel_l`` with integer ``zeros_l`` that
sum to ``num_pruned(sum numel_l, target)``: feeding them to ``topk_mask`` prunes exactly the planned total.

- ``uniform`` and ``erk``: the allocations of ``sparsecraft.allocation`` (one exact-rounding code path), called
  with ``max_sparsity=MAX_TRAINING_SPARSITY``: training may take a layer down to one weight (conv shapes allowed);
- ``global_magnitude``: one threshold on |w| over all layers (scores ranked across the whole model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from sparsecraft import allocation
from sparsecraft.patterns import check_sparsity, num_pruned, topk_mask

AllocationKind = Literal["uniform", "erk", "global_magnitude"]


# Training may prune a layer down to one weight; the engine's allocations default to at most 99%.
MAX_TRAINING_SPARSITY = 1.0 - 1e-12


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


def training_layer_sparsity(
    kind: AllocationKind, weights: Mapping[str, torch.Tensor], sparsity: float
) -> dict[str, float]:
    """Per-layer sparsity by allocation name; ``weights`` gives shapes (and magnitudes for ``global_magnitude``)."""
    shapes = {k: tuple(w.shape) for k, w in weights.items()}
    bounds = {"min_sparsity": 0.0, "max_sparsity": MAX_TRAINING_SPARSITY}
    if kind == "uniform":
        return allocation.uniform(shapes, check_sparsity(sparsity), "unstructured", **bounds)
    if kind == "erk":
        return allocation.erk(shapes, check_sparsity(sparsity), "unstructured", **bounds)
    if kind == "global_magnitude":
        return global_magnitude(weights, sparsity)
    raise ValueError(f"unknown allocation {kind!r}: use one of 'uniform', 'erk', 'global_magnitude'")


def realized_zeros(sparsities: Mapping[str, float], numel: Mapping[str, int]) -> int:
    """Total zeros ``topk_mask`` will produce for these per-layer sparsities."""
    return sum(num_pruned(numel[k], s) for k, s in sparsities.items())
