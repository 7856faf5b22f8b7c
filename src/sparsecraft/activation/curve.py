"""Perplexity against activation sparsity, and the PPL-p% sparsity of "Sparsing Law" (https://arxiv.org/abs/2411.02335).

PPL-p% sparsity: the highest activation sparsity at which perplexity rises by at most p% over the dense model. The
paper defines it for the neurons of the MLP activation with per-neuron thresholds; here the same definition is applied
to the calibrated thresholds of this package (one sparsity for every Linear input, TEAL or WINA rule), found by
bisection on the monotone curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsecraft.activation.allocation import model_sparsity
from sparsecraft.activation.stats import InputStats
from sparsecraft.activation.thresholds import attach, calibrate
from sparsecraft.engine.blocks import weight_2d
from sparsecraft.evaluate import perplexity


@dataclass(frozen=True)
class CurvePoint:
    sparsity: float  # planned (weight-weighted) activation sparsity
    realized: float  # fraction of Linear inputs zeroed while evaluating (weight-weighted)
    perplexity: float


def evaluate_plan(model: nn.Module, stats: dict[str, InputStats], plan: float | dict[str, float], method: str,
                  windows: torch.Tensor, batch_size: int = 4) -> CurvePoint:
    """Perplexity with thresholds for ``plan`` attached; detached afterwards whatever happens."""
    specs = calibrate(stats, plan, method)
    modules = dict(model.named_modules())
    weight = {f: weight_2d(modules[f]).numel() for f in specs}
    with attach(model, specs, record=True) as att:
        ppl = perplexity(model, windows, batch_size)
        realized = att.realized()
    planned = model_sparsity({f: s.sparsity for f, s in specs.items()}, weight)
    return CurvePoint(planned, model_sparsity(realized, weight), ppl)


def sparsity_curve(model: nn.Module, stats: dict[str, InputStats], sparsities: list[float], method: str,
                   windows: torch.Tensor, batch_size: int = 4) -> list[CurvePoint]:
    return [evaluate_plan(model, stats, s, method, windows, batch_size) for s in sparsities]


def ppl_p_sparsity(model: nn.Module, stats: dict[str, InputStats], windows: torch.Tensor, p: float = 1.0,
                   method: str = "teal", steps: int = 6, hi: float = 0.9, dense_ppl: float | None = None,
                   batch_size: int = 4) -> tuple[float, list[CurvePoint]]:
    """-> (highest uniform sparsity found with perplexity <= dense * (1 + p/100), every point evaluated).

    Bisection over [0, hi] with ``steps`` evaluations: the answer is within hi / 2**steps below the true one.
    """
    if p <= 0:
        raise ValueError(f"p is a percentage increase of perplexity and must be > 0, got {p}; e.g. 1 for PPL-1%")
    base = dense_ppl if dense_ppl is not None else perplexity(model, windows, batch_size)
    limit = base * (1.0 + p / 100.0)
    lo, top, points = 0.0, hi, []
    for _ in range(steps):
        mid = (lo + top) / 2
        point = evaluate_plan(model, stats, mid, method, windows, batch_size)
        points.append(point)
        lo, top = (mid, top) if point.perplexity <= limit else (lo, mid)
    return lo, points
