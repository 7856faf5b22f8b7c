"""Recovery: logit distillation from the unpruned teacher, run by ``transformers.Trainer`` (resumable from its
checkpoints), with a token budget: steps = ceil(tokens / (batch_size * seqlen)).

Loss: KL(teacher || student) on next-token distributions at temperature ``temperature`` (Hinton et al. 2015),
times temperature^2 so the gradient scale does not depend on it.

The same loop recovers an unstructured or N:M pruned model with its masks fixed (``keep``: fqn -> bool mask,
True = keep): the training package's MaskState zeroes the pruned weights' gradients and re-zeroes the weights
after every optimizer step, so shrink + distill and prune + masked distill compare at equal token budgets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from sparsecraft.training.hf import MaskCallback
from sparsecraft.training.masks import MaskState


@dataclass(frozen=True)
class DistillConfig:
    tokens: int  # training budget in tokens
    seqlen: int = 256
    batch_size: int = 4
    lr: float = 3e-4  # AdamW peak, cosine decay; the check that chose it is in docs/structured.md
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens < self.seqlen * self.batch_size:
            raise ValueError(f"distill tokens {self.tokens} is below one batch ({self.batch_size} x {self.seqlen}); "
                             f"raise --distill-tokens or lower the batch")
        if not self.lr > 0 or not self.temperature > 0:
            raise ValueError(f"distillation lr and temperature must be > 0, got {self.lr} and {self.temperature}")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch_size * self.seqlen))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) logits -> mean per-token KL(teacher || student) * T^2."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, -2)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i]}


class KDTrainer(Trainer):
    def __init__(self, *args, teacher: nn.Module, temperature: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()  # its logits are computed under no_grad; requires_grad is left as it was
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids, use_cache=False)
        loss = kd_loss(out.logits, teacher, self.temperature)
        return (loss, out) if return_outputs else loss


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, config: DistillConfig,
            work_dir: str | Path, resume: bool = False, keep: Mapping[str, torch.Tensor] | None = None,
            callbacks: Sequence[TrainerCallback] = ()) -> dict[str, float]:
    """Train ``student`` in place towards ``teacher`` on ``windows`` (n, seqlen) for ``config.steps`` steps.
    Checkpoints go to ``work_dir``; ``resume`` continues from the last one there. ``keep`` (fqn -> bool mask) holds
    those weights' pruned entries at exactly 0 throughout; ``callbacks`` go to the Trainer (e.g. an evaluation
    every few steps). -> {steps, tokens, loss}."""
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr, lr_scheduler_type="cosine", warmup_steps=max(1, config.steps // 20),
        logging_steps=max(1, config.steps // 10), save_steps=max(1, config.steps // 4), save_total_limit=1,
        report_to=[], use_cpu=not torch.cuda.is_available(), seed=config.seed, dataloader_num_workers=0,
        disable_tqdm=True, remove_unused_columns=False,
    )
    masks = MaskState(student, keep=keep) if keep else None
    callbacks = [*callbacks, *([MaskCallback(masks)] if masks else [])]
    student.train()
    try:
        trainer = KDTrainer(model=student, args=args, train_dataset=_Windows(windows), teacher=teacher,
                            temperature=config.temperature, callbacks=callbacks)
        has_ckpt = resume and any(Path(work_dir).glob("checkpoint-*"))
        out = trainer.train(resume_from_checkpoint=True if has_ckpt else None)
    finally:
        student.eval()
        if masks:
            masks.apply_()
            masks.remove()  # hooks and mask buffers off: the student is a plain (sparse-valued) model again
    return {"steps": config.steps, "tokens": config.steps * config.batch_size * windows.shape[1],
            "loss": float(out.training_loss)}
