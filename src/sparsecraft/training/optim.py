"""Optimizer-state surgery for mask changes: zero the moments of weights whose mask entry changed."""

from __future__ import annotations

import torch


@torch.no_grad()
def reset_optimizer_state_(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor) -> int:
    """Zero every per-element state tensor of ``param`` (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``, ...) at the positions ``where`` (bool, param-shaped).

    Scalar state such as Adam's ``step`` is shared by the whole tensor and left alone. Returns the number of
    state tensors touched (0 before the optimizer's first step, when it has no state yet).
    """
    if optimizer is None:
        return 0
    touched = 0
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.masked_fill_(where, 0.0)
            touched += 1
    return touched
