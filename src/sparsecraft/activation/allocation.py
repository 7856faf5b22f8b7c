"""Greedy per-layer allocation of activation sparsity reaching a model-wide target with the least block error.

Model-wide sparsity is weighted by the weight size of each Linear (out * in): it is the fraction of weight columns a
column-skipping kernel does not read, i.e. what decoding time follows.

Cost of a layer at a sparsity level (the TEAL recipe's idea, https://arxiv.org/abs/2408.14690, Sec. 4.2): the relative
squared error of its BLOCK's output when only that layer is sparsified, measured on calibration windows that flow
through the dense model block after block. The greedy step then raises, among all layers, the one whose next level
adds the least error per unit of model-wide sparsity, until the target is reached (the last step is partial, so the
target is met exactly). Costs are computed once; any target then costs nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparsecraft.activation.measure import linear_targets
from sparsecraft.activation.stats import InputStats
from sparsecraft.activation.thresholds import attach, calibrate
from sparsecraft.engine.blocks import weight_2d
from sparsecraft.engine.capture import BlockCall, as_batches
from sparsecraft.engine.driver import capture, run_blocks

LEVELS = tuple(round(0.1 * i, 2) for i in range(10))  # 0.0 .. 0.9


@dataclass(frozen=True)
class LayerCosts:
    """cost[fqn][i] = relative block-output error with layer fqn alone at sparsity levels[i]; weight = out * in."""

    levels: tuple[float, ...]
    cost: dict[str, list[float]]
    weight: dict[str, int]
    method: str
    block: dict[str, str] = field(default_factory=dict)  # fqn -> fqn of its block (for per-block allocation)


def _block_error(block: nn.Module, calls: list[BlockCall], dense: list[torch.Tensor], device) -> float:
    err, ref = 0.0, 0.0
    for call, y in zip(calls, dense):
        out = call.run(block, device).float().cpu()
        err += float((out - y).pow(2).sum())
        ref += float(y.pow(2).sum())
    return err / max(ref, 1e-30)


@torch.no_grad()
def layer_costs(model: nn.Module, windows: torch.Tensor, stats: dict[str, InputStats], method: str = "teal",
                levels: tuple[float, ...] = LEVELS, batch_size: int = 4, progress: bool = False) -> LayerCosts:
    """Per-layer error curves on ``windows`` (n, T); thresholds for every level come from ``stats``."""
    if levels[0] != 0.0 or list(levels) != sorted(levels):
        raise ValueError(f"levels must start at 0.0 and increase, got {levels}")
    device = next(model.parameters()).device
    targets = linear_targets(model)
    specs = {s: calibrate({f: stats[f] for f in targets}, s, method) for s in levels[1:]}
    prefix, blocks, calls = capture(model, as_batches(windows, batch_size), device)
    cost: dict[str, list[float]] = {}
    owner: dict[str, str] = {}

    def step(i: int, block: nn.Module, block_calls: list[BlockCall]) -> None:
        dense = [call.run(block, device).float().cpu() for call in block_calls]
        for fqn in [f for f in targets if f.startswith(f"{prefix}.{i}.")]:
            cost[fqn], owner[fqn] = [0.0], f"{prefix}.{i}"
            for s in levels[1:]:
                with attach(model, {fqn: specs[s][fqn]}):
                    cost[fqn].append(_block_error(block, block_calls, dense, device))

    run_blocks(blocks, calls, step, device, desc="layer costs", progress=progress)
    weight = {f: weight_2d(m).numel() for f, m in targets.items()}
    return LayerCosts(tuple(levels), cost, weight, method, owner)


def model_sparsity(plan: dict[str, float], weight: dict[str, int]) -> float:
    """Weight-size-weighted mean of the per-layer activation sparsities."""
    return sum(plan[f] * weight[f] for f in plan) / sum(weight[f] for f in plan)


def greedy_allocation(costs: LayerCosts, target: float, max_sparsity: float | None = None,
                      per_block: bool = False) -> dict[str, float]:
    """fqn -> sparsity with ``model_sparsity(plan) == target`` (up to float rounding), least added error first.

    ``per_block=True`` (TEAL's variant) runs the greedy inside each block with the block reaching the target itself:
    errors are then only compared between layers of one block, whose outputs share one normalization.
    """
    if not per_block:
        return _greedy(costs, target, max_sparsity)
    if set(costs.block) != set(costs.cost):
        raise ValueError("these layer costs carry no block of each layer; recompute them with layer_costs()")
    plan: dict[str, float] = {}
    for owner in dict.fromkeys(costs.block.values()):
        fqns = [f for f, b in costs.block.items() if b == owner]
        sub = LayerCosts(costs.levels, {f: costs.cost[f] for f in fqns}, {f: costs.weight[f] for f in fqns},
                         costs.method, {f: owner for f in fqns})
        plan.update(_greedy(sub, target, max_sparsity))
    return plan


def _greedy(costs: LayerCosts, target: float, max_sparsity: float | None) -> dict[str, float]:
    levels = [lv for lv in costs.levels if max_sparsity is None or lv <= max_sparsity]
    if not 0.0 <= target <= levels[-1]:
        raise ValueError(f"model-wide activation sparsity must be in [0, {levels[-1]}] (the largest level), got "
                         f"{target}; lower the target or pass more levels")
    total = sum(costs.weight.values())
    step = {f: 0 for f in costs.cost}
    plan = {f: 0.0 for f in costs.cost}
    reached = 0.0
    while reached < target - 1e-12:
        def marginal(f: str) -> float:
            i = step[f]
            gain = (levels[i + 1] - levels[i]) * costs.weight[f] / total
            return (costs.cost[f][i + 1] - costs.cost[f][i]) / gain
        open_layers = [f for f in step if step[f] + 1 < len(levels)]
        best = min(open_layers, key=marginal)
        i = step[best]
        gain = (levels[i + 1] - levels[i]) * costs.weight[best] / total
        if reached + gain >= target:  # partial last step: exactly the target
            plan[best] = levels[i] + (target - reached) * total / costs.weight[best]
            break
        step[best] += 1
        plan[best] = levels[i + 1]
        reached += gain
    return plan
