"""ALPS-style pruning: ADMM with a penalty schedule from a base mask, then PCG on the final support
(Meng et al. 2024, arXiv:2406.07831); math in solvers/alps.py. Never worse than the base method's result on the
layer objective tr(dW H dW^T).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sparsecraft.methods.admm import base_needs, build_base
from sparsecraft.methods.base import ALL_PATTERNS, LayerStats
from sparsecraft.patterns import Pattern, Scope
from sparsecraft.solvers.admm import best_of
from sparsecraft.solvers.alps import alps_solve


@dataclass(frozen=True)
class ALPS:
    base: str = "wanda"  # the starting mask and the never-worse reference
    base_options: dict[str, Any] = field(default_factory=dict)
    iters: int = 60  # ADMM iterations at most (stops earlier once the support is stable and rho >= rho_stop)
    rho: float = 0.1  # starting penalty, in Jacobi-scaled coordinates
    rho_stop: float = 10.0
    check_every: int = 3  # iterations between support checks / rho updates
    cg_iters: int = 50  # PCG iterations on the final support
    dampening: float = 0.01
    scope: Scope = "row"

    def __post_init__(self) -> None:
        if not (self.iters >= 0 and 0 < self.rho <= self.rho_stop and self.check_every >= 1 and self.cg_iters >= 0
                and self.dampening >= 0):
            raise ValueError(f"alps needs iters >= 0, 0 < rho <= rho_stop, check_every >= 1, cg_iters >= 0, "
                             f"dampening >= 0; got {self.iters}, {self.rho}, {self.rho_stop}, {self.check_every}, "
                             f"{self.cg_iters}, {self.dampening}")
        self.base_method()

    def base_method(self) -> Any:
        return build_base(self.base, self.base_options, "alps")

    @property
    def needs(self) -> tuple[str, ...]:
        return base_needs(self.base_method())

    @property
    def supports(self) -> tuple[type, ...]:
        return getattr(self.base_method(), "supports", ALL_PATTERNS)

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if stats.hessian is None:
            raise ValueError("alps needs calibration statistics (the Hessian); pass calibration data")
        start = self.base_method().prune(weight, stats, sparsity, pattern, generator)
        V, keep = alps_solve(weight, stats.hessian, start[1], sparsity, pattern, self.scope, self.iters, self.rho,
                             self.rho_stop, self.check_every, self.cg_iters, self.dampening)
        V, keep = best_of(weight, stats.hessian, start, (V.to(weight.dtype) * keep, keep))
        return V.to(weight.dtype), keep
