"""SquareHead distillation: per-layer L2 between the student's and the dense teacher's hidden states,
each normalised by the teacher's own energy so every layer counts about equally.

Kurtic et al. 2023, "Sparse Finetuning for Inference Acceleration of Large Language Models",
https://arxiv.org/abs/2310.06927, eq. 1:  L_l = MSE(h_t^l, h_s^l) / MSE(h_t^l, 0). We average over the layers
given (the paper sums; the mean keeps the loss scale independent of depth).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def squarehead_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Hidden states (B, T, C) per layer -> scalar loss. ``attention_mask`` (B, T) excludes padding tokens."""
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"need the same non-zero number of hidden states from student and teacher, got {len(student)} and "
            f"{len(teacher)}; call both models with output_hidden_states=True"
        )
    losses = []
    for s, t in zip(student, teacher):
        t = t.detach().float()
        s = s.float()
        if attention_mask is not None:
            w = attention_mask.to(t.dtype).unsqueeze(-1)  # (B, T, 1)
            num = ((s - t).pow(2) * w).sum() / (w.sum() * t.shape[-1])
            den = (t.pow(2) * w).sum() / (w.sum() * t.shape[-1])
        else:
            num, den = (s - t).pow(2).mean(), t.pow(2).mean()
        losses.append(num / (den + eps))
    return torch.stack(losses).mean()
