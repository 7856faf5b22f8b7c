"""Lottery tickets: iterative magnitude pruning (IMP) with weight rewinding, every round saved.

Frankle & Carbin 2019 (https://arxiv.org/abs/1803.03635) rewind to the initialisation; Frankle et al. 2020
("Linear Mode Connectivity and the Lottery Ticket Hypothesis", https://arxiv.org/abs/1912.05611) rewind to an
early step ``k``, which is what makes tickets work on larger networks. Round r trains, prunes
``prune_fraction`` of the weights still alive (so round r ends at sparsity 1 - (1 - p)^r), then resets every
surviving weight (and every other parameter and buffer) to its value at step ``rewind_step``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsecraft.patterns import Scope
from sparsecraft.training.allocation import AllocationKind, training_layer_sparsity
from sparsecraft.training.gmp import prune_to_
from sparsecraft.training.masks import KEEP_BUFFER, MaskState


@dataclass(frozen=True)
class LotteryConfig:
    rounds: int = 5  # pruning rounds after the dense round 0
    prune_fraction: float = 0.2  # fraction of the REMAINING weights removed per round
    rewind_step: int = 0  # 0 = rewind to the initialisation (original LTH)
    allocation: AllocationKind = "uniform"  # 'uniform' (layer-wise IMP) or 'global_magnitude' / 'erk'
    scope: Scope = "tensor"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be in (0, 1), e.g. 0.2 for 20% per round, got {self.prune_fraction}")
        if self.rewind_step < 0:
            raise ValueError(f"rewind_step must be >= 0, got {self.rewind_step}")


def round_sparsity(config: LotteryConfig, round_index: int) -> float:
    """Target sparsity after ``round_index`` pruning rounds: 1 - (1 - p)^r."""
    return 1.0 - (1.0 - config.prune_fraction) ** round_index


class LotteryTicket:
    """IMP bookkeeping for ``model``: the rewind point, the masks, and one safetensors file per round."""

    def __init__(self, model: nn.Module, config: LotteryConfig, out_dir: str | Path, fqns: list[str] | None = None):
        self.model = model
        self.config = config
        self.out_dir = Path(out_dir)
        self.state = MaskState(model, fqns=fqns)
        self.round = 0
        self.rewind: dict[str, torch.Tensor] | None = None

    def maybe_capture(self, step: int) -> bool:
        """Call at every training step of round 0 (before the update); saves the rewind point at ``rewind_step``."""
        if self.rewind is None and step == self.config.rewind_step:
            self.rewind = {
                k: v.detach().clone() for k, v in self.model.state_dict().items() if not k.endswith(KEEP_BUFFER)
            }
            return True
        return False

    @torch.no_grad()
    def next_round_(self) -> float:
        """Prune by the trained magnitudes to the next round's sparsity, then rewind; returns the sparsity."""
        if self.rewind is None:
            raise RuntimeError(
                f"no rewind point: call ticket.maybe_capture(step) at every step of round 0 (rewind_step="
                f"{self.config.rewind_step} must be reached)"
            )
        self.round += 1
        target = round_sparsity(self.config, self.round)
        weights = {fqn: self.state.weight(fqn) for fqn in self.state.fqns}
        prune_to_(self.state, training_layer_sparsity(self.config.allocation, weights, target), self.config.scope)
        self.model.load_state_dict(self.rewind, strict=False)  # masks are not in self.rewind: they stay
        self.state.apply_()
        return target

    def save_round(self, metrics: dict[str, float] | None = None) -> Path:
        """Write ``round_<r>.safetensors`` (weights + masks) with the config and metrics as metadata."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        meta = {"round": str(self.round), "sparsity": repr(self.state.sparsity()),
                "config": json.dumps(asdict(self.config)), "metrics": json.dumps(metrics or {})}
        path = self.out_dir / f"round_{self.round}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        return path


def load_round(model: nn.Module, path: str | Path) -> MaskState:
    """Load a saved round into a fresh ``model``; returns the re-attached MaskState."""
    tensors = load_file(str(path))
    state = MaskState.from_state_dict(model, tensors)
    model.load_state_dict(tensors)
    return state


def run_lottery(
    model: nn.Module,
    train_round: Callable[[LotteryTicket], dict[str, float]],
    config: LotteryConfig,
    out_dir: str | Path,
    fqns: list[str] | None = None,
) -> list[dict[str, float]]:
    """Round 0 dense, then ``config.rounds`` prune-rewind-retrain rounds. ``train_round(ticket)`` trains
    ``ticket.model`` (binding ``ticket.state`` to its optimizer, calling ``ticket.maybe_capture(step)`` every
    step) and returns metrics. Returns one record per round, each also saved under ``out_dir``."""
    ticket = LotteryTicket(model, config, out_dir, fqns)
    records = []
    for r in range(config.rounds + 1):
        if r > 0:
            ticket.next_round_()
        metrics = dict(train_round(ticket))
        metrics.update(round=float(r), sparsity=ticket.state.sparsity())
        ticket.save_round(metrics)
        records.append(metrics)
    return records
