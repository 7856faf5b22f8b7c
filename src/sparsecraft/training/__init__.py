"""Sparse training and fine-tuning: masks that survive training, schedules, allocations, GMP, SET/RigL,
lottery tickets, N:M training (SR-STE, decaying gradient flow), SquareHead distillation and sparse soups."""

from sparsecraft.training.allocation import MAX_TRAINING_SPARSITY, global_magnitude, training_layer_sparsity
from sparsecraft.training.distill import squarehead_loss
from sparsecraft.training.dst import DropAndGrow, DropAndGrowConfig, drop_and_grow_keep, drop_fraction_at
from sparsecraft.training.finetune import FinetuneConfig, masked_finetune
from sparsecraft.training.gmp import GMPConfig, GradualMagnitudePruner, magnitude_keep, prune_to_
from sparsecraft.training.lottery import LotteryConfig, LotteryTicket, load_round, round_sparsity, run_lottery
from sparsecraft.training.masks import KEEP_BUFFER, MaskState, maskable_modules
from sparsecraft.training.nm import NMTrainer, NMTrainingConfig, mask_decay_alpha, structure_decay_pattern
from sparsecraft.training.optim import reset_optimizer_state_
from sparsecraft.training.schedules import SparsitySchedule, cosine_decay, is_update_step, sparsity_at
from sparsecraft.training.soups import sparse_soup

__all__ = [
    "KEEP_BUFFER",
    "DropAndGrow",
    "DropAndGrowConfig",
    "FinetuneConfig",
    "GMPConfig",
    "GradualMagnitudePruner",
    "LotteryConfig",
    "LotteryTicket",
    "MaskState",
    "NMTrainer",
    "NMTrainingConfig",
    "SparsitySchedule",
    "load_round",
    "mask_decay_alpha",
    "masked_finetune",
    "round_sparsity",
    "run_lottery",
    "sparse_soup",
    "squarehead_loss",
    "structure_decay_pattern",
    "MAX_TRAINING_SPARSITY",
    "training_layer_sparsity",
    "cosine_decay",
    "drop_and_grow_keep",
    "drop_fraction_at",
    "maskable_modules",
    "global_magnitude",
    "is_update_step",
    "magnitude_keep",
    "prune_to_",
    "reset_optimizer_state_",
    "sparsity_at",
]
