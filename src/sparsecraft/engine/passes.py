"""Statistics passes over the DENSE model (nothing is pruned), on the one block driver."""

from __future__ import annotations

import torch
from torch import nn

from sparsecraft.engine.blocks import find_targets
from sparsecraft.engine.capture import BlockCall, Calibration, as_batches
from sparsecraft.engine.driver import capture, propagate, run_blocks
from sparsecraft.engine.hooks import collect_inputs


@torch.no_grad()
def input_sqnorms(model: nn.Module, calibration: Calibration, include: list[str] | None = None,
                  exclude: list[str] | None = None, batch_size: int = 8,
                  device: torch.device | str | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Mean x_j^2 of every prunable layer's input on the dense model: fqn -> (in,). One forward per block."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    blocks_fqn, blocks, calls = capture(model, as_batches(calibration, batch_size), device)
    out: dict[str, torch.Tensor] = {}

    def step(i: int, block: nn.Module, block_calls: list[BlockCall]) -> None:
        targets = find_targets(block, f"{blocks_fqn}.{i}", include, exclude)
        with collect_inputs(targets, ("sqnorm",), device, hessian=False) as collectors:
            propagate(block, block_calls, device)  # one forward measures and propagates
        out.update({f: c.sqnorm.value for f, c in collectors.items()})

    run_blocks(blocks, calls, step, device, desc="input statistics", progress=progress, propagate_outputs=False)
    return out
