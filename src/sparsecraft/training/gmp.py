"""Gradual magnitude pruning (GMP) during training, driven by a pure schedule and a layer allocation.

Call :meth:`GradualMagnitudePruner.step` once per training step, after ``optimizer.step()``. At the schedule's
update steps it computes the global target, splits it over layers with the allocation, and prunes the
smallest-magnitude weights of each layer; pruned weights are never brought back while the target grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecraft.patterns import Scope, topk_mask
from sparsecraft.training.allocation import AllocationKind, training_layer_sparsity
from sparsecraft.training.masks import MaskState, as_2d
from sparsecraft.training.optim import reset_optimizer_state_
from sparsecraft.training.schedules import SparsitySchedule, is_update_step, sparsity_at


@dataclass(frozen=True)
class GMPConfig:
    schedule: SparsitySchedule
    allocation: AllocationKind = "uniform"  # 'uniform' | 'erk' | 'global_magnitude'
    scope: Scope = "tensor"  # comparison group inside a layer: whole tensor or each output row

    def __post_init__(self) -> None:
        if self.allocation not in ("uniform", "erk", "global_magnitude"):
            raise ValueError(f"unknown allocation {self.allocation!r}: use 'uniform', 'erk' or 'global_magnitude'")
        if self.scope not in ("row", "tensor"):
            raise ValueError(f"scope must be 'row' or 'tensor', got {self.scope!r}")


def magnitude_keep(weight: torch.Tensor, keep: torch.Tensor, sparsity: float, scope: Scope) -> torch.Tensor:
    """Keep-mask pruning the smallest |w| at ``sparsity``; already-pruned weights (score -1) go first."""
    score = as_2d(weight.detach().abs().float()).masked_fill(~as_2d(keep), -1.0)  # (out, in*k), |w| >= 0 > -1
    return topk_mask(score, sparsity, scope=scope).reshape(keep.shape)


@torch.no_grad()
def prune_to_(
    state: MaskState,
    sparsities: dict[str, float],
    scope: Scope = "tensor",
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Magnitude-prune each layer of ``state`` to its planned sparsity; reset the optimizer moments of the
    newly pruned weights."""
    for fqn, s in sparsities.items():
        old = state.keep(fqn).clone()
        new = magnitude_keep(state.weight(fqn), old, s, scope)
        state.set_keep_(fqn, new)
        reset_optimizer_state_(optimizer, state.weight(fqn), old & ~new)


class GradualMagnitudePruner:
    """Zhu & Gupta's gradual magnitude pruning over the layers of ``state``."""

    def __init__(self, state: MaskState, config: GMPConfig, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.state = state
        self.config = config
        self.optimizer = optimizer

    def plan(self, step: int) -> dict[str, float]:
        """Per-layer sparsities at ``step`` (exact global count, see allocation.py)."""
        target = sparsity_at(self.config.schedule, step)
        weights = {fqn: self.state.weight(fqn) for fqn in self.state.fqns}
        return training_layer_sparsity(self.config.allocation, weights, target)

    def step(self, step: int) -> bool:
        """Prune if ``step`` is an update step of the schedule; returns whether the masks changed."""
        if not is_update_step(self.config.schedule, step):
            return False
        prune_to_(self.state, self.plan(step), self.config.scope, self.optimizer)
        self.state.broadcast_()
        return True
