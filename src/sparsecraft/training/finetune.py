"""Masked fine-tuning of a pruned causal LM, with optional SquareHead distillation from its dense teacher.

The masks are fixed: gradients of pruned weights are masked and the weights re-zeroed after every step, so
the sparsity after fine-tuning is exactly the sparsity before it (checked at the end).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from sparsecraft.training.distill import squarehead_loss
from sparsecraft.training.masks import MaskState


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 100
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear warm-up, then cosine decay to 0
    task_weight: float = 1.0  # next-token cross-entropy
    distill_weight: float = 1.0  # SquareHead on the hidden states (needs a teacher)
    grad_clip: float = 1.0  # max gradient norm; 0 disables

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("need steps >= 1, lr > 0, weight_decay >= 0, warmup_steps >= 0")
        if self.task_weight < 0 or self.distill_weight < 0 or self.task_weight + self.distill_weight == 0:
            raise ValueError("task_weight and distill_weight must be >= 0 and not both 0")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


def lr_factor(config: FinetuneConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    p = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


def masked_finetune(
    model: nn.Module,
    state: MaskState,
    batches: Iterable[torch.Tensor],
    config: FinetuneConfig,
    teacher: nn.Module | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` (a Hugging Face causal LM) on token batches (B, T) with its masks fixed.

    Loss = task_weight * CE + distill_weight * SquareHead(student, teacher hidden states) when a teacher is
    given. Stops after ``config.steps`` batches (cycling ``batches`` if shorter). Returns per-step records.
    """
    if config.distill_weight > 0 and teacher is None and config.task_weight == 0:
        raise ValueError("distillation-only fine-tuning needs a teacher model")
    zeros_before = state.zeros()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                            weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(config, s))
    hook = opt.register_step_post_hook(lambda *_: state.apply_())
    records: list[dict[str, float]] = []
    data = list(batches)
    model.train()
    try:
        for step in range(config.steps):
            ids = data[step % len(data)]
            out = model(input_ids=ids, labels=ids, output_hidden_states=teacher is not None)
            loss = config.task_weight * out.loss
            rec = {"step": float(step), "ce": out.loss.item()}
            if teacher is not None and config.distill_weight > 0:
                with torch.no_grad():
                    t_out = teacher(input_ids=ids, output_hidden_states=True)
                sq = squarehead_loss(out.hidden_states[1:], t_out.hidden_states[1:])  # skip the embedding output
                loss = loss + config.distill_weight * sq
                rec["squarehead"] = sq.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            rec["loss"] = loss.item()
            records.append(rec)
            if log is not None:
                log(rec)
    finally:
        hook.remove()
        model.eval()
    if state.zeros() != zeros_before:
        raise AssertionError("masked fine-tuning changed the mask: this is a bug in sparsecraft.training")
    return records
