"""Pruning methods, one file each, in one visible registry.

A method turns (weight, calibration statistics, sparsity, pattern) into (new weight, keep-mask). It never
mutates its inputs. Score methods only define ``score``; SparseGPT also reconstructs the kept weights.
"""

from __future__ import annotations

from typing import Any

from sparsecraft.methods.admm import ADMM
from sparsecraft.methods.alps import ALPS
from sparsecraft.methods.base import LayerStats, Method
from sparsecraft.methods.dsnot import DSnoT, with_dsnot
from sparsecraft.methods.magnitude import Magnitude
from sparsecraft.methods.random import Random
from sparsecraft.methods.ria import RIA
from sparsecraft.methods.sparsegpt import SparseGPT
from sparsecraft.methods.wanda import Wanda

METHODS: dict[str, type] = {
    "magnitude": Magnitude,
    "random": Random,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
    "dsnot": DSnoT,  # DSnoT(base=...): prune-and-grow refinement of any base method's mask
    "wanda+dsnot": with_dsnot("wanda"),
    "sparsegpt+dsnot": with_dsnot("sparsegpt"),
    "magnitude+dsnot": with_dsnot("magnitude"),
    "ria": RIA,  # relative importance x activation norm^a (N:M channel permutation: engine/permute.py)
    "admm": ADMM,  # ADMM weight update, gradual mask; never worse than its base (wanda) on tr(dW H dW^T)
    "alps": ALPS,  # ADMM with a rho schedule from the base mask + PCG on the final support; never worse
}


def register_method(name: str, cls: type) -> None:
    """Add a method class (a frozen dataclass with ``needs`` and ``prune``) under ``name``."""
    if name in METHODS:
        raise ValueError(f"a method named {name!r} is already registered; pick another name")
    if not callable(getattr(cls, "prune", None)):
        raise ValueError(f"method {name!r} must define prune(weight, stats, sparsity, pattern, generator)")
    METHODS[name] = cls


def get_method(name: str | Method, **options: Any) -> Method:
    """Build a method by name with its options, e.g. ``get_method("sparsegpt", dampening=0.05)``."""
    if not isinstance(name, str):
        return name
    key = name.strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[key](**options)
    except TypeError as e:
        raise ValueError(f"bad options for method {key!r}: {e}") from None


__all__ = ["METHODS", "LayerStats", "Method", "get_method", "register_method"]
