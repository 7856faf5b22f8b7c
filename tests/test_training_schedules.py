"""Schedules hit their targets at the right steps; allocations hit the global target exactly; GMP realizes it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsecraft.patterns import num_pruned
from sparsecraft.training import (
    GMPConfig,
    GradualMagnitudePruner,
    MaskState,
    MAX_TRAINING_SPARSITY,
    SparsitySchedule,
    cosine_decay,
    global_magnitude,
    is_update_step,
    sparsity_at,
    training_layer_sparsity,
)
from sparsecraft import allocation
from sparsecraft.training.allocation import realized_zeros


def erk(shapes, target):  # training's bounds: a layer may go down to one weight
    return allocation.erk(shapes, target, max_sparsity=MAX_TRAINING_SPARSITY)


def uniform(shapes, target):
    return allocation.uniform(shapes, target, max_sparsity=MAX_TRAINING_SPARSITY)

torch.set_num_threads(1)


def test_cubic_schedule_golden_values() -> None:
    s = SparsitySchedule(0.8, "cubic", initial_sparsity=0.0, start_step=10, end_step=50, frequency=10)
    assert [sparsity_at(s, t) for t in (0, 9)] == [0.0, 0.0]
    assert sparsity_at(s, 10) == 0.0  # the first update prunes to s_i
    assert sparsity_at(s, 20) == pytest.approx(0.8 * (1 - 0.75**3))  # 0.4625
    assert sparsity_at(s, 29) == sparsity_at(s, 20)  # piecewise constant between updates
    assert sparsity_at(s, 30) == pytest.approx(0.8 * (1 - 0.5**3))  # 0.7
    assert sparsity_at(s, 50) == 0.8 and sparsity_at(s, 10_000) == 0.8
    assert [t for t in range(70) if is_update_step(s, t)] == [10, 20, 30, 40, 50]


def test_linear_and_oneshot_schedules() -> None:
    lin = SparsitySchedule(0.9, "linear", initial_sparsity=0.1, start_step=0, end_step=8, frequency=3)
    assert [t for t in range(12) if is_update_step(lin, t)] == [0, 3, 6, 8]  # end_step always updates
    assert sparsity_at(lin, 4) == pytest.approx(0.1 + 0.8 * 3 / 8)
    assert sparsity_at(lin, 8) == 0.9
    one = SparsitySchedule(0.5, "oneshot", start_step=7)
    assert [sparsity_at(one, t) for t in (6, 7, 100)] == [0.0, 0.5, 0.5]
    assert [t for t in range(20) if is_update_step(one, t)] == [7]


def test_schedule_errors_say_how_to_fix() -> None:
    with pytest.raises(ValueError, match="for 50% pass 0.5"):
        SparsitySchedule(50)
    with pytest.raises(ValueError, match="kind='oneshot'"):
        SparsitySchedule(0.5, "cubic", start_step=5, end_step=5)
    with pytest.raises(ValueError, match="only increase"):
        SparsitySchedule(0.2, initial_sparsity=0.5, end_step=3)


def test_cosine_drop_fraction() -> None:
    assert cosine_decay(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_decay(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_decay(100, 0.3, 100) == 0.0


SHAPES = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "fc1": (128, 512), "fc2": (10, 128), "emb": (7, 3)}


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95])
def test_erk_hits_global_target_exactly(target: float) -> None:
    numel = {k: math.prod(v) for k, v in SHAPES.items()}
    plan = erk(SHAPES, target)
    assert realized_zeros(plan, numel) == num_pruned(sum(numel.values()), target)
    assert all(0.0 <= s < 1.0 for s in plan.values())
    # ERK gives the big fc1 the highest sparsity and small layers less
    assert plan["fc1"] == max(plan.values()) and plan["fc2"] < plan["fc1"]


def test_erk_small_layers_go_dense() -> None:
    plan = erk(SHAPES, 0.9)
    assert plan["emb"] == 0.0  # ERK density would exceed 1: dense, the rest re-solved
    numel = {k: math.prod(v) for k, v in SHAPES.items()}
    assert realized_zeros(plan, numel) == num_pruned(sum(numel.values()), 0.9)


def test_uniform_and_global_magnitude_exact() -> None:
    numel = {k: math.prod(v) for k, v in SHAPES.items()}
    plan = uniform(SHAPES, 0.7)
    assert realized_zeros(plan, numel) == num_pruned(sum(numel.values()), 0.7)
    assert all(abs(s - 0.7) <= 1.0 / numel[k] for k, s in plan.items())
    # global magnitude: layer "big" has all the small weights -> it takes all the pruning
    weights = {"small": torch.full((4, 4), 100.0), "big": torch.arange(1.0, 33.0).reshape(4, 8)}
    assert global_magnitude(weights, 0.5) == {"small": 0.0, "big": 0.75}  # 24 of 48 zeros, all in "big"
    with pytest.raises(ValueError, match="'uniform', 'erk', 'global_magnitude'"):
        training_layer_sparsity("owl", weights, 0.5)  # type: ignore[arg-type]
    # a threshold that would empty a layer leaves it one weight and prunes elsewhere instead
    tiny = {"a": torch.full((2, 2), 1e-3), "b": torch.arange(1.0, 9.0).reshape(2, 4)}
    assert global_magnitude(tiny, 0.5) == {"a": 0.75, "b": 3 / 8}


@pytest.mark.parametrize("allocation", ["uniform", "erk", "global_magnitude"])
def test_gmp_realizes_schedule_at_update_steps(allocation: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 3))
    state = MaskState(model)
    schedule = SparsitySchedule(0.9, "cubic", start_step=2, end_step=12, frequency=5)
    pruner = GradualMagnitudePruner(state, GMPConfig(schedule, allocation))  # type: ignore[arg-type]
    total = sum(state.numel().values())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state.bind(opt)
    seen = {}
    for step in range(15):
        x = torch.randn(16, 20)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        changed = pruner.step(step)
        assert changed == (step in (2, 7, 12))
        seen[step] = sum(state.zeros().values())
        assert seen[step] == num_pruned(total, sparsity_at(schedule, step))
    assert seen[12] == num_pruned(total, 0.9) and seen[1] == 0
    assert all(torch.count_nonzero(state.weight(f)[~state.keep(f)]) == 0 for f in state.fqns)
