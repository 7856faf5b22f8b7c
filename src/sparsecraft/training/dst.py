"""Dynamic sparse training: SET (random regrowth) and RigL (regrowth by dense-gradient magnitude).

At each update step every layer drops the ``k = round(f(t) * active)`` active weights of smallest magnitude
and grows exactly ``k`` connections among those that were inactive BEFORE the drop, so density is exactly
constant and every grown connection is new: it starts at exactly 0 and its optimizer moments are reset.
(RigL's reference code may re-grow a just-dropped connection with its old value; excluding them makes the
"new weights start at zero" rule and the count exact.) ``f(t)`` is the cosine-decayed drop fraction.

- SET: Mocanu et al. 2018, https://arxiv.org/abs/1707.04780 (grow at random);
- RigL: Evci et al. 2020, https://arxiv.org/abs/1911.11134 (grow where |dL/dw| of the dense gradient is largest).

Loop contract: call :meth:`DropAndGrow.step` once per step AFTER ``optimizer.step()``. For RigL the object
asks the :class:`MaskState` to record the dense gradient during the backward pass of each update step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sparsecraft.patterns import num_pruned, topk_mask
from sparsecraft.training.masks import MaskState, as_2d
from sparsecraft.training.optim import reset_optimizer_state_
from sparsecraft.training.schedules import cosine_decay

GrowKind = Literal["random", "gradient"]


@dataclass(frozen=True)
class DropAndGrowConfig:
    grow: GrowKind = "gradient"  # 'gradient' = RigL, 'random' = SET
    drop_fraction: float = 0.3  # alpha: fraction of active weights replaced at the first update
    frequency: int = 100  # delta T: steps between updates
    start_step: int = 0  # first update at start_step + frequency
    end_step: int = 1000  # T_end: no updates from here on; the drop fraction decays to 0 here
    seed: int = 0  # for SET's random growth (rank 0's choice is broadcast under DDP)

    def __post_init__(self) -> None:
        if self.grow not in ("random", "gradient"):
            raise ValueError(f"grow must be 'random' (SET) or 'gradient' (RigL), got {self.grow!r}")
        if not 0.0 < self.drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in (0, 1), e.g. 0.3, got {self.drop_fraction}")
        if self.frequency < 1 or self.start_step < 0 or self.end_step <= self.start_step:
            raise ValueError(
                f"need frequency >= 1 and 0 <= start_step < end_step, got frequency={self.frequency}, "
                f"start_step={self.start_step}, end_step={self.end_step}"
            )


def is_update_step(config: DropAndGrowConfig, step: int) -> bool:
    t = step - config.start_step
    return t > 0 and t % config.frequency == 0 and step < config.end_step


def drop_fraction_at(config: DropAndGrowConfig, step: int) -> float:
    return cosine_decay(step - config.start_step, config.drop_fraction, config.end_step - config.start_step)


def drop_and_grow_keep(
    weight: torch.Tensor, keep: torch.Tensor, grow_score: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, int]:
    """Pure: (new keep, k). Drops the k smallest |w| among active, grows the k highest ``grow_score`` among
    the previously inactive (k is capped by the number of inactive connections)."""
    n = keep.numel()
    active = int(keep.sum())
    k = min(num_pruned(active, fraction), n - active)
    if k == 0:
        return keep.clone(), 0
    magnitude = as_2d(weight.detach().abs().float()).masked_fill(~as_2d(keep), -1.0)  # inactive go first
    after_drop = topk_mask(magnitude, (n - active + k) / n, scope="tensor")  # exactly n-active+k zeros
    candidates = ~as_2d(keep)
    score = as_2d(grow_score.detach().float()).masked_fill(~candidates, float("-inf"))
    grown = topk_mask(score, (n - k) / n, scope="tensor") & candidates  # exactly k kept = k grown
    return (after_drop | grown).reshape(keep.shape), k


class DropAndGrow:
    """SET / RigL controller over the masks of ``state``; the optimizer is needed to reset moments."""

    def __init__(self, state: MaskState, optimizer: torch.optim.Optimizer, config: DropAndGrowConfig) -> None:
        self.state = state
        self.optimizer = optimizer
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.history: list[dict[str, int]] = []  # per update: grown count per fqn
        self._want_grads(0)

    def _want_grads(self, next_step: int) -> None:
        self.state.record_grads = self.config.grow == "gradient" and is_update_step(self.config, next_step)
        if not self.state.record_grads:
            self.state.dense_grads.clear()

    def _grow_score(self, fqn: str) -> torch.Tensor:
        weight = self.state.weight(fqn)
        if self.config.grow == "random":
            return torch.rand(weight.shape, generator=self.generator).to(weight.device)
        grad = self.state.dense_grads.get(fqn)
        if grad is None:
            raise RuntimeError(
                f"RigL needs the dense gradient of {fqn!r} at this update step: call DropAndGrow.step(step) once "
                f"per step after optimizer.step(), with a backward pass in every step"
            )
        return grad.abs()

    @torch.no_grad()
    def step(self, step: int) -> bool:
        """Drop and grow if ``step`` is an update step; returns whether the masks changed."""
        updated = is_update_step(self.config, step)
        if updated:
            fraction = drop_fraction_at(self.config, step)
            before = {fqn: self.state.keep(fqn).clone() for fqn in self.state.fqns}
            for fqn, old in before.items():
                new, _ = drop_and_grow_keep(self.state.weight(fqn), old, self._grow_score(fqn), fraction)
                self.state.set_keep_(fqn, new)
            self.state.broadcast_()  # under DDP every rank takes rank 0's masks before touching moments
            grown: dict[str, int] = {}
            for fqn, old in before.items():
                new, weight = self.state.keep(fqn), self.state.weight(fqn)
                weight.masked_fill_(new & ~old, 0.0)  # grown connections start at exactly zero
                reset_optimizer_state_(self.optimizer, weight, new ^ old)  # grown and dropped: fresh moments
                grown[fqn] = int((new & ~old).sum())
            self.history.append(grown)
        self._want_grads(step + 1)
        return updated
