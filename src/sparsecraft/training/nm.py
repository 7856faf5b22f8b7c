"""N:M sparse training from dense weights: SR-STE and the decaying gradient flows MDGF / SDGF.

The dense weight stays the trained parameter; a parametrization (``torch.nn.utils.parametrize``, removable)
makes every forward pass see an N:M-masked version of it, with the mask recomputed from |w| each step:

- ``srste``: forward W * M; backward dL/dW = dL/dW~ + lambda_W * (1 - M) * W  (Zhou et al. 2021,
  "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch", https://arxiv.org/abs/2102.04010,
  eq. 6: straight-through gradient plus a decay that pulls pruned weights towards 0 so the mask settles);
- ``mdgf``: forward W * (M + alpha(t) * (1 - M)): the pruned weights' mask value, and with it their gradient
  flow, decays from ``initial_alpha`` to 0 (linear or exponential), "mask decay gradient flow" of Bambhaniya
  et al. 2024, "Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers",
  https://arxiv.org/abs/2402.04744;
- ``sdgf``: binary masks whose pattern decays geometrically n = m/2, m/4, ..., target n in equal stages
  ("structure decay gradient flow", same paper).

:meth:`NMTrainer.finalize` fixes the final N:M masks, removes the parametrizations and returns a
:class:`MaskState` for any further (masked) training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsecraft.patterns import NM, check_shape, topk_mask
from sparsecraft.training.masks import MaskState, as_2d

NMMethod = Literal["srste", "mdgf", "sdgf"]


@dataclass(frozen=True)
class NMTrainingConfig:
    pattern: NM = NM(2, 4)
    method: NMMethod = "srste"
    srste_decay: float = 2e-4  # lambda_W of SR-STE
    decay: Literal["linear", "exponential"] = "exponential"  # MDGF's alpha(t) shape
    initial_alpha: float = 1.0  # MDGF: mask value of pruned weights at step 0 (1 = dense forward)
    decay_rate: float = 5.0  # MDGF exponential: alpha = initial * exp(-rate * t / end_step)
    end_step: int = 1000  # MDGF: alpha is 0 from here; SDGF: the target pattern holds from here

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, NM):
            raise ValueError(
                f"pattern must be an NM, e.g. NM(2, 4) (parse '2:4' with parse_pattern), got {self.pattern!r}"
            )
        if self.method not in ("srste", "mdgf", "sdgf"):
            raise ValueError(f"unknown N:M method {self.method!r}: use 'srste', 'mdgf' or 'sdgf'")
        if self.decay not in ("linear", "exponential"):
            raise ValueError(f"decay must be 'linear' or 'exponential', got {self.decay!r}")
        if self.srste_decay < 0 or not 0.0 <= self.initial_alpha <= 1.0 or self.decay_rate <= 0 or self.end_step < 1:
            raise ValueError("need srste_decay >= 0, 0 <= initial_alpha <= 1, decay_rate > 0 and end_step >= 1")


def mask_decay_alpha(config: NMTrainingConfig, step: int) -> float:
    """MDGF's mask value for pruned weights at ``step`` (0 from ``end_step`` on)."""
    if step >= config.end_step:
        return 0.0
    p = max(step, 0) / config.end_step
    if config.decay == "linear":
        return config.initial_alpha * (1.0 - p)
    return config.initial_alpha * math.exp(-config.decay_rate * p)


def structure_decay_pattern(config: NMTrainingConfig, step: int) -> NM:
    """SDGF's pattern at ``step``: n = m/2, m/4, ... down to the target n, in equal stages up to ``end_step``."""
    m, target = config.pattern.m, config.pattern.n
    stages = []
    n = m // 2
    while n > target:
        stages.append(n)
        n //= 2
    stages.append(target)
    k = min(max(step, 0) * len(stages) // config.end_step, len(stages) - 1)
    return NM(stages[k], m)


class _SRSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, keep: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, keep)
        ctx.decay = decay
        return weight * keep

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, keep = ctx.saved_tensors
        return grad + ctx.decay * weight * ~keep, None, None  # straight-through + sparse-refined decay


class NMParametrization(nn.Module):
    """weight -> N:M-masked weight for the forward pass; its fields are set by :class:`NMTrainer`."""

    def __init__(self, method: NMMethod, pattern: NM, srste_decay: float, alpha: float) -> None:
        super().__init__()
        self.method, self.pattern, self.srste_decay, self.alpha = method, pattern, srste_decay, alpha

    def keep(self, weight: torch.Tensor) -> torch.Tensor:
        return topk_mask(as_2d(weight.detach().abs()), None, self.pattern).reshape(weight.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        keep = self.keep(weight)
        if self.method == "srste":
            return _SRSTE.apply(weight, keep, self.srste_decay)
        if self.method == "mdgf":
            return weight * torch.where(keep, 1.0, self.alpha).to(weight.dtype)
        return weight * keep  # sdgf: binary mask of the current (decaying) pattern


class NMTrainer:
    """Attach N:M training to the Linear / Conv2d modules ``fqns`` of ``model``; call :meth:`step` every step."""

    def __init__(self, model: nn.Module, config: NMTrainingConfig, fqns: list[str]) -> None:
        self.model, self.config, self.fqns = model, config, list(fqns)
        self.params: dict[str, NMParametrization] = {}
        for fqn in self.fqns:
            module = model.get_submodule(fqn)
            check_shape(tuple(as_2d(module.weight).shape), config.pattern, fqn)
            p = NMParametrization(config.method, config.pattern, config.srste_decay, config.initial_alpha)
            parametrize.register_parametrization(module, "weight", p)
            self.params[fqn] = p
        self.step(0)

    def step(self, step: int) -> None:
        """Set the decayed alpha (MDGF) or pattern (SDGF) for ``step``."""
        for p in self.params.values():
            p.alpha = mask_decay_alpha(self.config, step)
            if self.config.method == "sdgf":
                p.pattern = structure_decay_pattern(self.config, step)

    def masks(self) -> dict[str, torch.Tensor]:
        """The target-pattern N:M masks of the current dense weights."""
        out = {}
        for fqn in self.fqns:
            dense = self.model.get_submodule(fqn).parametrizations.weight.original
            out[fqn] = topk_mask(as_2d(dense.detach().abs()), None, self.config.pattern).reshape(dense.shape)
        return out

    def remove(self) -> None:
        """Take the parametrizations off, leaving the dense weights (no masking)."""
        for fqn in self.fqns:
            module = self.model.get_submodule(fqn)
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)

    def finalize(self) -> MaskState:
        """Fix the final N:M masks, remove the parametrizations, zero the pruned weights; returns the MaskState."""
        masks = self.masks()
        self.remove()
        return MaskState(self.model, keep=masks)
