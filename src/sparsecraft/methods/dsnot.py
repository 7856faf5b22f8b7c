"""DSnoT refinement as a method wrapper: run any base method, then prune-and-grow its mask (see solvers/dsnot.py).

Registered names: "wanda+dsnot", "sparsegpt+dsnot", "magnitude+dsnot"; or ``DSnoT(base=...)`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, ClassVar

import torch

from sparsecraft.methods.base import LayerStats
from sparsecraft.patterns import NM, Pattern, Unstructured
from sparsecraft.solvers.dsnot import dsnot_refine


@dataclass(frozen=True)
class DSnoT:
    base: str = "wanda"  # the method whose mask is refined
    max_iter: int = 50  # prune-and-grow swaps per row, at most (the paper's "cycles")
    candidates: int = 1  # grow candidates tried per row and swap (1 = greedy best grow only)
    base_options: dict[str, Any] = field(default_factory=dict)  # options of the base method
    dampening: float = 0.0  # ridge on the Hessian that drives the swaps (x mean diagonal); the guard is undamped
    supports: ClassVar[tuple[type, ...]] = (Unstructured, NM)  # swaps keep row counts and N:M groups, not tiles

    def __post_init__(self) -> None:
        if "dsnot" in self.base:
            raise ValueError(f"dsnot base must be a plain method such as 'wanda' or 'sparsegpt', got {self.base!r}")
        if self.max_iter < 0 or self.candidates < 1 or not self.dampening >= 0:
            raise ValueError(f"dsnot needs max_iter >= 0, candidates >= 1 and dampening >= 0, got {self.max_iter}, "
                             f"{self.candidates}, {self.dampening}")
        self.base_method()  # fail early on an unknown base or bad options

    def base_method(self) -> Any:
        from sparsecraft.methods import get_method  # the registry imports this module

        return get_method(self.base, **self.base_options)

    @property
    def needs(self) -> tuple[str, ...]:
        """The base's statistics plus the Hessian that defines the reconstruction error."""
        return tuple(dict.fromkeys((*self.base_method().needs, "hessian")))

    def prune(self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if stats.hessian is None:
            raise ValueError("dsnot needs calibration statistics (the Hessian); pass calibration data")
        w_new, keep = self.base_method().prune(weight, stats, sparsity, pattern, generator)
        return dsnot_refine(weight, w_new, keep, stats.hessian, pattern, self.max_iter, self.candidates,
                            self.dampening)


def with_dsnot(base: str) -> type:
    """A registrable class: DSnoT on top of ``base`` with ``base`` as its default (e.g. for "wanda+dsnot")."""
    return make_dataclass(f"{base.capitalize()}DSnoT", [("base", str, field(default=base))], bases=(DSnoT,),
                          frozen=True)
