"""One calibration pass over the dense model with a statistics hook on the input of every Linear in the blocks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sparsecraft.activation.stats import InputStats, LayerSummary
from sparsecraft.engine.blocks import find_blocks, find_targets, weight_2d


def linear_targets(model: nn.Module, include: list[str] | None = None,
                   exclude: list[str] | None = None) -> dict[str, nn.Module]:
    """Every Linear (or GPT-2 Conv1D) inside the model's repeated blocks, keyed by fqn, in forward order."""
    prefix, blocks = find_blocks(model)
    found: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        found.update(find_targets(block, f"{prefix}.{i}", include, exclude))
    if not found:
        raise ValueError("no Linear layers matched inside the model's blocks; loosen --include/--exclude patterns")
    return found


def is_mlp_down(fqn: str, module: nn.Module, model: nn.Module) -> bool:
    """The MLP's output projection: its input is the (gated) activation, the lazy-neuron view (by shape)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    out_f, in_f = weight_2d(module).shape
    return hidden is not None and out_f == hidden and in_f > hidden


@contextmanager
def input_hooks(targets: dict[str, nn.Module], stats: dict[str, InputStats]) -> Iterator[dict[str, InputStats]]:
    """Attach one forward pre-hook per target feeding ``stats[fqn]``; always remove them."""
    handles = []
    try:
        for fqn, module in targets.items():
            s = stats[fqn]
            handles.append(module.register_forward_pre_hook(lambda _m, args, s=s: s.update(args[0])))
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def measure(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, include: list[str] | None = None,
            exclude: list[str] | None = None) -> dict[str, InputStats]:
    """windows (n, T) token ids -> statistics of every Linear input in the blocks, on the model as it is."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"calibration needs token windows of shape (n, seqlen) with n >= 1, got "
                         f"{tuple(windows.shape)}")
    targets = linear_targets(model, include, exclude)
    stats = {fqn: InputStats(weight_2d(m).detach().float().norm(dim=0), is_mlp_down(fqn, m, model))
             for fqn, m in targets.items()}
    device = next(model.parameters()).device
    with input_hooks(targets, stats):
        for batch in windows.split(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    return stats


def summarize(stats: dict[str, InputStats], eps: float = 0.01) -> list[LayerSummary]:
    return [s.summary(fqn, eps) for fqn, s in stats.items()]
