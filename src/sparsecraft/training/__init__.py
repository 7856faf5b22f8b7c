"""Sparse training and fine-tuning: masks that survive training, schedules, allocations, GMP, SET/RigL,
lottery tickets, N:M training (SR-STE, decaying gradient flow), SquareHead distillation and sparse soups."""

from sparsecraft.training.allocation import allocate, erk, global_magnitude, uniform
from sparsecraft.training.dst import DropAndGrow, DropAndGrowConfig, drop_and_grow_keep, drop_fraction_at
from sparsecraft.training.gmp import GMPConfig, GradualMagnitudePruner, magnitude_keep, prune_to_
from sparsecraft.training.masks import KEEP_BUFFER, MaskState, find_targets
from sparsecraft.training.optim import reset_optimizer_state_
from sparsecraft.training.schedules import SparsitySchedule, cosine_decay, is_update_step, sparsity_at

__all__ = [
    "KEEP_BUFFER",
    "DropAndGrow",
    "DropAndGrowConfig",
    "GMPConfig",
    "GradualMagnitudePruner",
    "MaskState",
    "SparsitySchedule",
    "allocate",
    "cosine_decay",
    "drop_and_grow_keep",
    "drop_fraction_at",
    "erk",
    "find_targets",
    "global_magnitude",
    "is_update_step",
    "magnitude_keep",
    "prune_to_",
    "reset_optimizer_state_",
    "sparsity_at",
    "uniform",
]
