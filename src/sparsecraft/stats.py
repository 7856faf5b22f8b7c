"""Running statistics of a layer's inputs, accumulated batch by batch (the "add_batch" half of a method).

Both are running means in float32, so the numbers do not depend on how tokens are split into batches.
"""

from __future__ import annotations

import torch


class InputSqNorm:
    """Mean over tokens of x_j^2 for every input feature j: Wanda's ||X_j||_2^2 / N."""

    def __init__(self, features: int) -> None:
        self.sum = torch.zeros(features, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.sum += x.pow(2).sum(0).double().cpu()
        self.count += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        """(in,) float32 mean of x_j^2; multiply by ``count`` for the squared column norm."""
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer; pass a non-empty calibration set")
        return (self.sum / self.count).float()


class Hessian:
    """H = 2/N * sum_t x_t x_t^T, the Hessian of the layer-wise squared reconstruction error (SparseGPT)."""

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().to(self.H.device)  # (tokens, in)
        n = x.shape[0]
        # running mean: H <- H * old/new + 2/new * X^T X
        self.H.mul_(self.count / (self.count + n))
        self.count += n
        self.H.addmm_(x.T, x, alpha=2.0 / self.count)

    @property
    def value(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer; pass a non-empty calibration set")
        return self.H
