"""Per-layer sparsity plans computed BEFORE the engine runs: dict[fqn, sparsity] for ``prune(..., plan=...)``.

Kinds: ``uniform``; ``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020); ``owl`` (outlier-weighed layerwise sparsity,
Yin et al. 2023, arXiv:2310.05175); ``search`` (an EvoPress-style evolutionary search over per-block levels,
Sieberling et al. 2024, arXiv:2410.14649; see ``sparsecraft.search``).

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
from torch import nn

from sparsecraft.engine.blocks import find_blocks, find_targets, set_weight_2d_, weight_2d
from sparsecraft.engine.capture import capture_block_inputs
from sparsecraft.engine.hooks import collect_inputs
from sparsecraft.methods.wanda import wanda_score
from sparsecraft.patterns import (NM, Block, Pattern, Unstructured, check_sparsity, num_pruned, parse_pattern,
                                  split_counts)

ALLOCATIONS = ("uniform", "erk", "owl", "search")
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
    pattern = _no_nm(parse_pattern(pattern), "erk")
    raw = {k: (sum(shape) / math.prod(shape)) ** power for k, shape in shapes.items()}
    t_lo = -1.0 / min(raw.values())  # every density >= 1: all sparsities clip at min_sparsity
    return fit_exact(lambda t: {k: 1.0 + t * v for k, v in raw.items()}, _units(shapes, pattern), target,
                     min_sparsity, max_sparsity, (t_lo, 0.0))


def owl(outlier_ratio: Mapping[str, float], shapes: Shapes, target: float, pattern: Pattern | str = "unstructured",
        lam: float = 0.08, min_sparsity: float = 0.0, max_sparsity: float = 0.99) -> dict[str, float]:
    """OWL: layers with more outliers stay denser. Ratios are rescaled to [0, 2*lam]; sparsity = target - (r' -
    mean r'), then one shift makes the parameter-weighted total exact (Yin et al. 2023, Sec. 3)."""
    pattern = _no_nm(parse_pattern(pattern), "owl")
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"owl lambda must be in [0, 1) (the paper uses 0.08), got {lam}")
    r = {k: outlier_ratio[k] for k in shapes}
    spread = max(r.values()) - min(r.values())
    scaled = {k: (v - min(r.values())) / spread * 2 * lam if spread > 0 else 0.0 for k, v in r.items()}
    mean = sum(scaled.values()) / len(scaled)
    base = {k: target - (v - mean) for k, v in scaled.items()}
    return shifted(base, shapes, target, pattern, min_sparsity, max_sparsity)


def _no_nm(pattern: Pattern, kind: str) -> Pattern:
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


def layers_by_block(model: nn.Module, include: list[str] | None = None,
                    exclude: list[str] | None = None) -> dict[str, dict[str, nn.Module]]:
    """block fqn -> {layer fqn: module}: the layers the engine would prune, in block order."""
    blocks_fqn, blocks = find_blocks(model)
    return {f"{blocks_fqn}.{i}": find_targets(b, f"{blocks_fqn}.{i}", include, exclude) for i, b in enumerate(blocks)}


def prunable_layers(model: nn.Module, include: list[str] | None = None,
                    exclude: list[str] | None = None) -> dict[str, nn.Module]:
    """fqn -> module of every layer the engine would prune, in block order."""
    return {f: m for targets in layers_by_block(model, include, exclude).values() for f, m in targets.items()}


@torch.no_grad()
def dense_input_sqnorms(model: nn.Module, calibration: Any, include: list[str] | None = None,
                        exclude: list[str] | None = None, batch_size: int = 8,
                        device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Stats-only pass over the DENSE model (nothing is pruned): mean x_j^2 of every target's input, fqn -> (in,).

    Reuses the engine's capture and hooks; one forward per block, no Hessians.
    """
    from sparsecraft.api import as_batches  # api imports the engine; imported here to keep this module light

    device = torch.device(device) if device is not None else next(model.parameters()).device
    blocks_fqn, blocks = find_blocks(model)
    calls = capture_block_inputs(model, blocks[0], as_batches(calibration, batch_size), device)
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        targets = find_targets(block, f"{blocks_fqn}.{i}", include, exclude)
        with collect_inputs(targets, ("sqnorm",), device, hessian=False) as collectors:
            for call in calls:
                call.hidden = call.run(block, device).to(call.hidden.device)
        out.update({f: c.sqnorm.value for f, c in collectors.items()})
    return out


def allocate(model: nn.Module, kind: str, sparsity: float | None, pattern: str | Pattern = "unstructured",
             calibration: Any = None, *, include: list[str] | None = None, exclude: list[str] | None = None,
             min_sparsity: float = 0.0, max_sparsity: float = 0.99, options: Mapping[str, Any] | None = None,
             seed: int = 0, batch_size: int = 8, device: torch.device | str | None = None) -> dict[str, float]:
    """A per-layer plan for ``prune(model, ..., plan=...)`` reaching ``sparsity`` exactly; the model is unchanged.

    Options: erk ``power``; owl ``M`` (default 5) and ``lam`` (default 0.08); search: see ``sparsecraft.search``.
    """
    options = dict(options or {})
    if kind not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {kind!r}; valid allocations: {', '.join(ALLOCATIONS)}")
    pattern = parse_pattern(pattern)
    by_block = layers_by_block(model, include, exclude)
    layers = {f: m for targets in by_block.values() for f, m in targets.items()}
    groups = {f: b for b, targets in by_block.items() for f in targets}
    if not layers:
        raise ValueError("no prunable layers matched; loosen include/exclude patterns")
    shapes = {f: tuple(weight_2d(m).shape) for f, m in layers.items()}
    if isinstance(pattern, NM) and kind == "uniform":
        return uniform(shapes, pattern.sparsity, pattern)
    target = check_sparsity(0.5 if sparsity is None else sparsity)
    bounds = {"min_sparsity": min_sparsity, "max_sparsity": max_sparsity}
    _check_options(kind, options)
    if kind == "uniform":
        return uniform(shapes, target, pattern, **bounds)
    if kind == "erk":
        return erk(shapes, target, pattern, power=float(options.get("power", 1.0)), **bounds)
    _no_nm(pattern, kind)
    if calibration is None:
        raise ValueError(f"allocation {kind!r} needs calibration data; pass calibration token ids (n, seqlen)")
    sqnorms = dense_input_sqnorms(model, calibration, include, exclude, batch_size, device)
    weights = {f: weight_2d(m).detach() for f, m in layers.items()}
    if kind == "owl":
        ratios = outlier_ratios(weights, sqnorms, float(options.get("M", 5.0)), groups)
        return owl(ratios, shapes, target, pattern, float(options.get("lam", 0.08)), **bounds)
    return search_plan(model, layers, groups, sqnorms, calibration, target, pattern, seed=seed,
                       batch_size=batch_size, **bounds, **options)


_OPTIONS = {"uniform": set(), "erk": {"power"}, "owl": {"M", "lam"},
            "search": {"generations", "offspring", "survivors", "step", "max_levels", "fitness_windows",
                       "fitness_tokens"}}


def _check_options(kind: str, options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        raise ValueError(f"unknown options {unknown} for allocation {kind!r}; valid: "
                         f"{', '.join(sorted(_OPTIONS[kind])) or 'none'}")


def realized_sparsity(plan: Mapping[str, float], shapes: Shapes, pattern: Pattern | str = "unstructured") -> float:
    """The exact global sparsity the engine will realize for ``plan`` (units pruned / units)."""
    units = _units(shapes, parse_pattern(pattern))
    zeros = sum(num_pruned(units[k], plan[k]) for k in units)
    return zeros / sum(units.values())


# ---- EvoPress-style search (Sieberling et al. 2024): per-block levels, scored by KL to the dense model ----------

def score_ranks(weights: Mapping[str, torch.Tensor], sqnorms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fqn -> (out, in) int32 rank of each weight within its row by ascending Wanda score (ties: lower index first),
    so that ``rank >= count`` is the engine's row-wise Wanda mask for any sparsity (a level "database" in O(1))."""
    ranks = {}
    for fqn, w in weights.items():
        order = torch.sort(wanda_score(w, sqnorms[fqn]), dim=1, stable=True).indices  # (out, in)
        r = torch.empty_like(order, dtype=torch.int32)
        r.scatter_(1, order, torch.arange(w.shape[1], dtype=torch.int32).expand(w.shape[0], -1).contiguous())
        ranks[fqn] = r
    return ranks


@torch.no_grad()
def apply_ranked_plan_(layers: Mapping[str, nn.Module], dense: Mapping[str, torch.Tensor],
                       ranks: Mapping[str, torch.Tensor], plan: Mapping[str, float]) -> None:
    """In place: every layer in ``plan`` gets its dense weight masked at its planned sparsity (row-wise, exact
    counts as the engine's Wanda); layers absent from ``plan`` get their dense weight back."""
    for fqn, module in layers.items():
        w = dense[fqn]
        if fqn in plan and plan[fqn] > 0:
            counts = split_counts(w.numel(), w.shape[0], plan[fqn])  # (out,)
            w = w * (ranks[fqn] >= counts.unsqueeze(1))
        set_weight_2d_(module, w)


@torch.no_grad()
def token_logprobs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n, T) token ids -> (n, T, V) float32 log-probabilities."""
    device = next(model.parameters()).device
    outs = [torch.log_softmax(model(input_ids=b.to(device), use_cache=False).logits.float(), -1).cpu()
            for b in windows.split(batch_size)]
    return torch.cat(outs)


def kl_to_dense(model: nn.Module, windows: torch.Tensor, ref: torch.Tensor, batch_size: int) -> float:
    """Mean per-token KL(dense || model) over ``windows``; ``ref`` = the dense model's log-probabilities."""
    logp = token_logprobs(model, windows, batch_size)
    return float((ref.exp() * (ref - logp)).sum(-1).mean())


def search_plan(model: nn.Module, layers: Mapping[str, nn.Module], groups: Mapping[str, str],
                sqnorms: Mapping[str, torch.Tensor], calibration: torch.Tensor, target: float, pattern: Pattern, *,
                seed: int = 0, batch_size: int = 8, min_sparsity: float = 0.0, max_sparsity: float = 0.99,
                generations: int = 16, offspring: int = 6, survivors: int = 2, step: float = 0.04,
                max_levels: int = 5, fitness_windows: int = 4, fitness_tokens: int = 256) -> dict[str, float]:
    """(1 + lambda) evolution over per-block offsets k_b (sparsity_b = target + k_b * step, |k_b| <= max_levels).

    A mutation moves one block up one level and another down one (the total is preserved for equal-size blocks;
    ``shifted`` makes every plan exact anyway). Offspring are scored on the first fitness window, the best
    ``survivors`` on all ``fitness_windows`` (EvoPress' multi-step selection); the parent is replaced only by a
    better child. Candidates use Wanda masks from dense statistics. Budget: about ``generations * (offspring /
    fitness_windows + survivors)`` forward passes over the fitness set. Deterministic for a seed. The model's
    weights are restored before returning.
    """
    if not isinstance(calibration, torch.Tensor) or calibration.ndim != 2:
        raise ValueError("allocation 'search' needs calibration token ids as one (n, seqlen) tensor")
    if min(generations, offspring, survivors, max_levels, fitness_windows, fitness_tokens) < 1 or step <= 0:
        raise ValueError("search options generations, offspring, survivors, max_levels, fitness_windows, "
                         "fitness_tokens must be >= 1 and step > 0")
    shapes = {f: tuple(weight_2d(m).shape) for f, m in layers.items()}
    blocks = sorted(set(groups.values()), key=list(groups.values()).index)
    windows = calibration[-fitness_windows:, :fitness_tokens]  # (w, t): the calibration set's last windows
    dense = {f: weight_2d(m).detach().clone() for f, m in layers.items()}
    ranks = score_ranks(dense, sqnorms)
    rng = torch.Generator().manual_seed(seed)

    def plan_of(levels: tuple[int, ...]) -> dict[str, float]:
        base = {f: target + levels[blocks.index(groups[f])] * step for f in layers}
        return shifted(base, shapes, target, pattern, min_sparsity, max_sparsity)

    def fitness(levels: tuple[int, ...], w: torch.Tensor, ref: torch.Tensor) -> float:
        apply_ranked_plan_(layers, dense, ranks, plan_of(levels))
        return kl_to_dense(model, w, ref, batch_size)

    try:
        ref_all = token_logprobs(model, windows, batch_size)
        parent = tuple(0 for _ in blocks)
        best = fitness(parent, windows, ref_all)
        for _ in range(generations):
            children = [_mutate(parent, max_levels, rng) for _ in range(offspring)]
            quick = sorted(((fitness(c, windows[:1], ref_all[:1]), i) for i, c in enumerate(children)))
            for _, i in quick[:survivors]:
                score = fitness(children[i], windows, ref_all)
                if score < best:
                    parent, best = children[i], score
    finally:
        apply_ranked_plan_(layers, dense, ranks, {})
    return plan_of(parent)


def _mutate(levels: tuple[int, ...], max_levels: int, rng: torch.Generator) -> tuple[int, ...]:
    """Move 1-3 random (up, down) pairs of blocks by one level each, within +-max_levels."""
    out = list(levels)
    n = len(out)
    for _ in range(int(torch.randint(1, 4, (1,), generator=rng))):
        up, down = torch.randperm(n, generator=rng)[:2].tolist() if n > 1 else (0, 0)
        if up != down and out[up] < max_levels and out[down] > -max_levels:
            out[up] += 1
            out[down] -= 1
    return tuple(out)
