"""Per-layer sparsity (``layer_sparsity``: dict[fqn, sparsity]) computed BEFORE the engine runs: pure plan math.

Kinds: ``uniform``; ``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020); ``owl`` (outlier-weighed layerwise sparsity,
Yin et al. 2023, arXiv:2310.05175); ``search`` (an EvoPress-style evolutionary search over per-block levels,
Sieberling et al. 2024, arXiv:2410.14649; in ``sparsecraft.search``).

Exactness: every plan is ``zeros_l / units_l`` with INTEGER ``zeros_l`` (units = weights, or tiles for block
patterns) that sum to ``num_pruned(sum units_l, target)``. The engine prunes ``num_pruned(units_l, zeros_l /
units_l) == zeros_l`` units per layer, so the realized global sparsity, weighted by parameter count, is exactly the
target's count. Bounds ``[min_sparsity, max_sparsity]`` are enforced on the integer counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from sparsecraft.methods.wanda import wanda_score
from sparsecraft.patterns import NM, Block, Pattern, Unstructured, check_sparsity, num_pruned, parse_pattern

# The registry of allocation kinds: name -> the pure function computing the per-layer sparsity. "search" is the
# EvoPress-style search of sparsecraft.search (it needs the model, so it lives above the engine); sparsecraft.allocate
# dispatches over both.
ALLOCATIONS: dict[str, Callable[..., dict[str, float]] | None] = {}
Shapes = Mapping[str, tuple[int, ...]]  # (out, in) weights; uniform and erk also take conv shapes (out, in, kh, kw)


def unit_area(pattern: Pattern) -> int:
    """Weights per pruning unit: 1, or the tile area of a block pattern."""
    return pattern.rows * pattern.cols if isinstance(pattern, Block) else 1


def _bounds(units: Mapping[str, int], lo: float, hi: float) -> tuple[dict[str, int], dict[str, int]]:
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"need 0 <= min_sparsity <= max_sparsity < 1, got min={lo}, max={hi}")
    lo_c = {k: math.ceil(lo * u - 1e-9) for k, u in units.items()}
    hi_c = {k: min(math.floor(hi * u + 1e-9), u - 1) for k, u in units.items()}
    return lo_c, hi_c


def fit_exact(sparsity_of: Callable[[float], Mapping[str, float]], units: Mapping[str, int], target: float,
              lo: float, hi: float, t_range: tuple[float, float]) -> dict[str, float]:
    """Integer zero counts hitting ``num_pruned(sum units, target)`` exactly, within bounds.

    ``sparsity_of(t)`` is a family of per-layer sparsities increasing in ``t``; ``t`` is found by bisection on the
    clipped real-valued total, then the counts are rounded by largest remainder (ties by fqn: deterministic).
    """
    target = check_sparsity(target)
    lo_c, hi_c = _bounds(units, lo, hi)
    total = num_pruned(sum(units.values()), target)
    if not sum(lo_c.values()) <= total <= sum(hi_c.values()):
        raise ValueError(f"target sparsity {target} cannot be met within per-layer bounds [{lo}, {hi}]; widen "
                         f"min_sparsity/max_sparsity so that the target lies between them")

    def real(t: float) -> dict[str, float]:
        s = sparsity_of(t)
        return {k: min(max(s[k] * u, lo_c[k]), hi_c[k]) for k, u in units.items()}

    a, b = t_range
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if sum(real(mid).values()) < total else (a, mid)
    return round_counts(real(b), units, lo_c, hi_c, total)


def round_counts(real: Mapping[str, float], units: Mapping[str, int], lo_c: Mapping[str, int],
                 hi_c: Mapping[str, int], total: int) -> dict[str, float]:
    """Largest-remainder rounding of real zero counts to integers summing to ``total``; -> sparsities."""
    counts = {k: min(max(math.floor(v), lo_c[k]), hi_c[k]) for k, v in real.items()}
    frac = sorted(real, key=lambda k: (-(real[k] - math.floor(real[k])), k))
    short = total - sum(counts.values())
    while short != 0:
        step = 1 if short > 0 else -1
        order = frac if step > 0 else frac[::-1]
        moved = False
        for k in order:
            if short != 0 and lo_c[k] <= counts[k] + step <= hi_c[k]:
                counts[k] += step
                short -= step
                moved = True
        assert moved, "bounds were checked to be feasible"
    return {k: counts[k] / units[k] for k in units}


def _units(shapes: Shapes, pattern: Pattern) -> dict[str, int]:
    area = unit_area(pattern)
    return {k: math.prod(shape) // area for k, shape in shapes.items()}


def shifted(base: Mapping[str, float], shapes: Shapes, target: float, pattern: Pattern = Unstructured(),
            min_sparsity: float = 0.0, max_sparsity: float = 0.99) -> dict[str, float]:
    """``base`` sparsities plus one common shift, clipped to the bounds, hitting the target exactly."""
    return fit_exact(lambda t: {k: s + t for k, s in base.items()}, _units(shapes, pattern), target,
                     min_sparsity, max_sparsity, (-1.0, 1.0))


def uniform(shapes: Shapes, target: float, pattern: Pattern | str = "unstructured", min_sparsity: float = 0.0,
            max_sparsity: float = 0.99) -> dict[str, float]:
    """Every layer at ``target`` up to one unit of rounding, so that the global count is exact."""
    pattern = parse_pattern(pattern)
    if isinstance(pattern, NM):
        return {k: pattern.sparsity for k in shapes}
    return shifted({k: target for k in shapes}, shapes, target, pattern, min_sparsity, max_sparsity)


def erk(shapes: Shapes, target: float, pattern: Pattern | str = "unstructured", min_sparsity: float = 0.0,
        max_sparsity: float = 0.99, power: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel (Evci et al. 2020): density_l = eps * (sum(shape_l) / prod(shape_l)) ** power, i.e.
    (rows + cols) / (rows * cols) for a Linear, eps fitted to the target; layers it would make denser than 1 clip
    at ``min_sparsity`` and the rest are re-solved by the fit."""
    pattern = require_varying(parse_pattern(pattern), "erk")
    raw = {k: (sum(shape) / math.prod(shape)) ** power for k, shape in shapes.items()}
    t_lo = -1.0 / min(raw.values())  # every density >= 1: all sparsities clip at min_sparsity
    return fit_exact(lambda t: {k: 1.0 + t * v for k, v in raw.items()}, _units(shapes, pattern), target,
                     min_sparsity, max_sparsity, (t_lo, 0.0))


def owl(outlier_ratio: Mapping[str, float], shapes: Shapes, target: float, pattern: Pattern | str = "unstructured",
        lam: float = 0.08, min_sparsity: float = 0.0, max_sparsity: float = 0.99) -> dict[str, float]:
    """OWL: layers with more outliers stay denser. Ratios are rescaled to [0, 2*lam]; sparsity = target - (r' -
    mean r'), then one shift makes the parameter-weighted total exact (Yin et al. 2023, Sec. 3)."""
    pattern = require_varying(parse_pattern(pattern), "owl")
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"owl lambda must be in [0, 1) (the paper uses 0.08), got {lam}")
    r = {k: outlier_ratio[k] for k in shapes}
    spread = max(r.values()) - min(r.values())
    scaled = {k: (v - min(r.values())) / spread * 2 * lam if spread > 0 else 0.0 for k, v in r.items()}
    mean = sum(scaled.values()) / len(scaled)
    base = {k: target - (v - mean) for k, v in scaled.items()}
    return shifted(base, shapes, target, pattern, min_sparsity, max_sparsity)


def require_varying(pattern: Pattern, kind: str) -> Pattern:
    if isinstance(pattern, NM):
        raise ValueError(f"allocation {kind!r} varies the sparsity per layer, but N:M pattern {pattern} fixes it; "
                         f"use allocation 'uniform' with N:M, or an unstructured/block pattern")
    return pattern


def outlier_ratios(weights: Mapping[str, torch.Tensor], sqnorms: Mapping[str, torch.Tensor], M: float = 5.0,
                   groups: Mapping[str, str] | None = None) -> dict[str, float]:
    """Layer-wise outlier distribution: the share of Wanda scores above ``M`` x their mean, pooled over every layer
    of a group (``groups``: fqn -> block fqn, as in OWL; default: each layer alone); a layer gets its group's ratio."""
    if M <= 0:
        raise ValueError(f"owl M must be > 0 (the paper uses 5), got {M}")
    groups = dict(groups or {f: f for f in weights})
    pooled: dict[str, list[torch.Tensor]] = {}
    for fqn, w in weights.items():
        pooled.setdefault(groups[fqn], []).append(wanda_score(w, sqnorms[fqn]).flatten())
    ratio = {}
    for g, parts in pooled.items():
        s = torch.cat(parts)  # every score of the group
        ratio[g] = float((s > M * s.mean()).double().mean())
    return {fqn: ratio[groups[fqn]] for fqn in weights}


def realized_sparsity(plan: Mapping[str, float], shapes: Shapes, pattern: Pattern | str = "unstructured") -> float:
    """The exact global sparsity the engine will realize for ``plan`` (units pruned / units)."""
    units = _units(shapes, parse_pattern(pattern))
    zeros = sum(num_pruned(units[k], plan[k]) for k in units)
    return zeros / sum(units.values())


ALLOCATIONS.update({"uniform": uniform, "erk": erk, "owl": owl, "search": None})
ALLOCATION_OPTIONS: dict[str, set[str]] = {"uniform": set(), "erk": {"power"}, "owl": {"M", "lam"},
                                           "search": {"generations", "offspring", "survivors", "step", "max_levels",
                                                      "fitness_windows", "fitness_tokens"}}


def check_allocation(kind: str, options: Mapping[str, Any]) -> None:
    """Unknown kinds or options raise an error listing the valid ones."""
    if kind not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {kind!r}; valid allocations: {', '.join(ALLOCATIONS)}")
    unknown = sorted(set(options) - ALLOCATION_OPTIONS[kind])
    if unknown:
        raise ValueError(f"unknown options {unknown} for allocation {kind!r}; valid: "
                         f"{', '.join(sorted(ALLOCATION_OPTIONS[kind])) or 'none'}")
