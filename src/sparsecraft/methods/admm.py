"""ADMM weight update with a gradually tightened mask (Boza 2024, arXiv:2401.02938); math in solvers/admm.py.

The base method (Wanda by default, any registered method) gives the starting mask and weights; the result is the
one with the lower layer objective tr(dW H dW^T): never worse than the start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sparsecraft.methods.base import ALL_PATTERNS, LayerStats
from sparsecraft.patterns import Pattern, Scope
from sparsecraft.solvers.admm import admm_gradual, best_of


def base_needs(method: Any) -> tuple[str, ...]:
    """A base method's statistics plus the Hessian that the ADMM solvers need."""
    return tuple(dict.fromkeys((*method.needs, "hessian")))


def build_base(name: str, options: dict[str, Any], owner: str) -> Any:
    from sparsecraft.methods import get_method  # the registry imports this module

    if name in ("admm", "alps"):
        raise ValueError(f"{owner} base must be a plain method such as 'wanda' or 'sparsegpt', got {name!r}")
    return get_method(name, **options)


@dataclass(frozen=True)
class ADMM:
    base: str = "wanda"  # the method whose result is the never-worse reference (and the mask when gradual=False)
    base_options: dict[str, Any] = field(default_factory=dict)
    gradual: bool = True  # tighten the mask from dense on a cubic schedule; False: update the base mask's weights
    iters: int = 40  # ADMM iterations in all
    mask_iters: int = 30  # iterations during which the mask is re-chosen (every ``update_every``)
    update_every: int = 3
    rho: float = 1.0  # penalty, in Jacobi-scaled coordinates (unit-diagonal Hessian)
    dampening: float = 0.01  # ridge on the scaled Hessian (fraction of its unit diagonal)
    scope: Scope = "row"  # comparison group of unstructured / block masks, as Wanda's

    def __post_init__(self) -> None:
        if not (self.iters >= self.mask_iters >= 1 and self.update_every >= 1 and self.rho > 0
                and self.dampening >= 0):
            raise ValueError(f"admm needs iters >= mask_iters >= 1, update_every >= 1, rho > 0, dampening >= 0; got "
                             f"{self.iters}, {self.mask_iters}, {self.update_every}, {self.rho}, {self.dampening}")
        self.base_method()  # fail early on an unknown base or bad options

    def base_method(self) -> Any:
        return build_base(self.base, self.base_options, "admm")

    @property
    def needs(self) -> tuple[str, ...]:
        return base_needs(self.base_method())

    @property
    def supports(self) -> tuple[type, ...]:
        return getattr(self.base_method(), "supports", ALL_PATTERNS)

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if stats.hessian is None:
            raise ValueError("admm needs calibration statistics (the Hessian); pass calibration data")
        start = self.base_method().prune(weight, stats, sparsity, pattern, generator)
        V, keep = admm_gradual(weight, stats.hessian, sparsity, pattern, self.scope, self.iters, self.mask_iters,
                               self.update_every, self.rho, self.dampening,
                               keep=None if self.gradual else start[1])
        V, keep = best_of(weight, stats.hessian, start, (V.to(weight.dtype) * keep, keep))
        return V.to(weight.dtype), keep
