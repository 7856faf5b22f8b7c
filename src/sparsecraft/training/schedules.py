"""Pure schedules: step -> sparsity, and step -> drop fraction / decay factor.

A :class:`SparsitySchedule` changes the sparsity only at its *update steps*: ``start_step``,
``start_step + frequency``, ... (every step ``< end_step`` on that grid) and ``end_step`` itself. Between two
update steps the sparsity holds its last value; before ``start_step`` it is ``initial_sparsity``; from
``end_step`` on it is ``final_sparsity``.

- ``oneshot``: jumps to ``final_sparsity`` at ``start_step`` (``end_step`` is ignored);
- ``linear``:  s(t) = s_f + (s_i - s_f) * (1 - p),    p = (t - start) / (end - start);
- ``cubic``:   s(t) = s_f + (s_i - s_f) * (1 - p)^3 (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1,
  https://arxiv.org/abs/1710.01878): prune fast while many redundant weights remain, slowly near the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sparsecraft.patterns import check_sparsity

ScheduleKind = Literal["oneshot", "linear", "cubic"]


@dataclass(frozen=True)
class SparsitySchedule:
    final_sparsity: float
    kind: ScheduleKind = "cubic"
    initial_sparsity: float = 0.0  # sparsity before start_step (and the value AT start_step for linear/cubic)
    start_step: int = 0
    end_step: int = 1  # first step at which final_sparsity holds
    frequency: int = 1  # steps between mask updates (Zhu & Gupta's delta t)

    def __post_init__(self) -> None:
        check_sparsity(self.final_sparsity)
        check_sparsity(self.initial_sparsity)
        if self.kind not in ("oneshot", "linear", "cubic"):
            raise ValueError(f"unknown schedule kind {self.kind!r}: use 'oneshot', 'linear' or 'cubic'")
        for name in ("start_step", "end_step", "frequency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.frequency < 1:
            raise ValueError(f"frequency must be >= 1 (steps between mask updates), got {self.frequency}")
        if self.kind != "oneshot" and self.end_step <= self.start_step:
            raise ValueError(
                f"end_step ({self.end_step}) must be after start_step ({self.start_step}) for a {self.kind} "
                f"schedule; use kind='oneshot' to prune at a single step"
            )
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity ({self.initial_sparsity}) > final_sparsity ({self.final_sparsity}): "
                f"schedules only increase sparsity"
            )


def is_update_step(schedule: SparsitySchedule, step: int) -> bool:
    """True at the steps where the sparsity (and so the mask) may change."""
    if schedule.kind == "oneshot":
        return step == schedule.start_step
    if step < schedule.start_step or step > schedule.end_step:
        return False
    return step == schedule.end_step or (step - schedule.start_step) % schedule.frequency == 0


def last_update_step(schedule: SparsitySchedule, step: int) -> int | None:
    """The latest update step <= ``step`` (None before the first one)."""
    if step < schedule.start_step:
        return None
    if schedule.kind == "oneshot" or step >= schedule.end_step:
        return schedule.start_step if schedule.kind == "oneshot" else schedule.end_step
    return schedule.start_step + (step - schedule.start_step) // schedule.frequency * schedule.frequency


def sparsity_at(schedule: SparsitySchedule, step: int) -> float:
    """The target sparsity in force at ``step`` (piecewise constant between update steps)."""
    t = last_update_step(schedule, step)
    s_i, s_f = schedule.initial_sparsity, schedule.final_sparsity
    if t is None:
        return s_i
    if schedule.kind == "oneshot":
        return s_f
    p = (t - schedule.start_step) / (schedule.end_step - schedule.start_step)  # in [0, 1]
    power = 1 if schedule.kind == "linear" else 3
    return s_f + (s_i - s_f) * (1.0 - p) ** power


def cosine_decay(step: int, initial: float, end_step: int) -> float:
    """initial / 2 * (1 + cos(pi * step / end_step)), and 0 from ``end_step`` on: RigL's drop fraction
    (Evci et al. 2020, https://arxiv.org/abs/1911.11134, eq. 1)."""
    if step >= end_step:
        return 0.0
    return initial / 2.0 * (1.0 + math.cos(math.pi * max(step, 0) / end_step))
