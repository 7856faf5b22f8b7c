"""THE block-by-block driver: every pass over a model's blocks (one-shot pruning, statistics passes, activation
costs) captures block-0 inputs once, then for each block: move it to the compute device, run a step on it with the
cached inputs, replace the inputs by the block's outputs, move it back.

Streaming (blocks loaded from disk) and distributed passes plug in here, so they are written once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsecraft.engine.blocks import find_blocks
from sparsecraft.engine.capture import BlockCall, auto_offload, capture_block_inputs, outside_blocks_on

# step(i, block, calls): work on block i (already on the compute device) with its cached inputs ``calls``.
BlockStep = Callable[[int, nn.Module, list[BlockCall]], None]


def capture(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str,
            offload: torch.device | str = "cpu") -> tuple[str, nn.ModuleList, list[BlockCall]]:
    """Find the blocks and catch what block 0 receives for every batch -> (blocks fqn, blocks, calls).

    ``offload`` is where the cached inputs live: a device, or ``"auto"`` (the GPU when they fit, else the CPU).

    Embeddings and everything else outside the blocks visit ``device`` for the capture and go back afterwards.
    """
    blocks_fqn, blocks = find_blocks(model)
    if str(offload) == "auto":
        batches = list(batches)
        offload = auto_offload(model, batches, device, next(model.parameters()).dtype)
    with outside_blocks_on(model, blocks_fqn, device):
        calls = capture_block_inputs(model, blocks[0], batches, device, offload)
    return blocks_fqn, blocks, calls


def propagate(block: nn.Module, calls: list[BlockCall], device: torch.device | str) -> None:
    """Replace every batch's hidden states with the block's outputs; non-finite outputs stop the pass (checked
    once per block, not per layer)."""
    with torch.no_grad():
        for call in calls:
            out = call.run(block, device)
            # one reduction instead of isfinite + all: a NaN or inf anywhere makes the float32 sum non-finite
            if not torch.isfinite(out.sum(dtype=torch.float32)):
                raise ValueError("block outputs contain NaN or inf; try --dtype float32 or check the model weights")
            call.hidden = out.to(call.hidden.device)


def block_home(block: nn.Module) -> torch.device:
    first = next(block.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def run_blocks(blocks: nn.ModuleList, calls: list[BlockCall], step: BlockStep, device: torch.device | str, *,
               start: int = 0, desc: str = "blocks", progress: bool = False, propagate_outputs: bool = True,
               after: Callable[[int], None] | None = None) -> None:
    """For blocks ``start..``: move to ``device``, ``step``, propagate the (possibly changed) block's outputs, move
    back, then ``after(i)``. ``calls`` must hold the inputs of block ``start``; on return they hold the model's last
    hidden states. ``propagate_outputs=False``: the step propagates itself (e.g. with statistics hooks attached, so
    that one forward both measures and propagates). An exception from ``step`` or the propagation leaves the block on
    its home device and propagates.
    """
    bar = tqdm(range(start, len(blocks)), desc=desc, unit="block", disable=not progress, initial=start,
               total=len(blocks))
    for i in bar:
        block = blocks[i]
        home = block_home(block)
        try:
            block.to(device)
            step(i, block, calls)
            if propagate_outputs:
                propagate(block, calls, device)
        finally:
            block.to(home)
        if after is not None:
            after(i)
