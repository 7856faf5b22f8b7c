"""Perplexity: exp of the mean next-token negative log-likelihood over every predicted token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               device: torch.device | str | None = None, progress: bool = False) -> float:
    """windows (n, T) token ids; each window is scored independently (T - 1 predictions per window)."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"perplexity needs token windows of shape (n, seqlen) with n >= 1, got {tuple(windows.shape)}")
    device = device or next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        target = batch[:, 1:]  # (B, T-1)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count)
