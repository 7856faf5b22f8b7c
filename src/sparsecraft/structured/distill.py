"""Recovery: logit distillation from the unpruned teacher, run by ``transformers.Trainer`` (resumable from its
checkpoints), with a token budget: steps = ceil(tokens / (batch_size * seqlen)).

Loss: KL(teacher || student) on next-token distributions at temperature ``temperature`` (Hinton et al. 2015),
times temperature^2 so the gradient scale does not depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments


@dataclass(frozen=True)
class DistillConfig:
    tokens: int  # training budget in tokens
    seqlen: int = 256
    batch_size: int = 4
    lr: float = 1e-4
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens < self.seqlen * self.batch_size:
            raise ValueError(f"distill tokens {self.tokens} is below one batch ({self.batch_size} x {self.seqlen}); "
                             f"raise --distill-tokens or lower the batch")

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
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids, use_cache=False)
        loss = kd_loss(out.logits, teacher, self.temperature)
        return (loss, out) if return_outputs else loss


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, config: DistillConfig,
            work_dir: str | Path, resume: bool = False) -> dict[str, float]:
    """Train ``student`` in place towards ``teacher`` on ``windows`` (n, seqlen) for ``config.steps`` steps.
    Checkpoints go to ``work_dir``; ``resume`` continues from the last one there. -> {steps, tokens, loss}."""
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr, lr_scheduler_type="cosine", warmup_steps=max(1, config.steps // 20),
        logging_steps=max(1, config.steps // 10), save_steps=max(1, config.steps // 4), save_total_limit=1,
        report_to=[], use_cpu=not torch.cuda.is_available(), seed=config.seed, dataloader_num_workers=0,
        disable_tqdm=True, remove_unused_columns=False,
    )
    student.train()
    trainer = KDTrainer(model=student, args=args, train_dataset=_Windows(windows), teacher=teacher,
                        temperature=config.temperature)
    has_ckpt = resume and any(Path(work_dir).glob("checkpoint-*"))
    out = trainer.train(resume_from_checkpoint=True if has_ckpt else None)
    student.eval()
    return {"steps": config.steps, "tokens": config.steps * config.batch_size * windows.shape[1],
            "loss": float(out.training_loss)}
