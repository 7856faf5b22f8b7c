"""Forward hooks owned by context managers: they are removed in ``finally``, whatever happens."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sparsecraft.engine.blocks import weight_2d
from sparsecraft.stats import Hessian, InputSqNorm


class LayerCollector:
    """The statistics one layer's method asks for, plus the Hessian used for the reconstruction error."""

    def __init__(self, module: nn.Module, fqn: str, needs: tuple[str, ...], device: torch.device | str,
                 hessian: bool = True) -> None:
        features = weight_2d(module).shape[1]
        self.fqn = fqn
        self.sqnorm = InputSqNorm(features) if "sqnorm" in needs else None
        # hessian=False only for stats-only passes (e.g. allocation) that never measure a reconstruction error
        self.hessian = Hessian(features, device) if hessian or "hessian" in needs else None

    def update(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise ValueError(
                f"calibration activations entering {self.fqn} contain NaN or inf; check the weights of the "
                f"earlier layers and the dtype (try --dtype float32)"
            )
        if self.sqnorm is not None:
            self.sqnorm.update(x)
        if self.hessian is not None:
            self.hessian.update(x)


@contextmanager
def collect_inputs(targets: dict[str, nn.Module], needs: tuple[str, ...], device: torch.device | str,
                   hessian: bool = True) -> Iterator[dict[str, LayerCollector]]:
    """Attach one input-statistics hook per target; yield the collectors; always remove the hooks."""
    collectors = {fqn: LayerCollector(m, fqn, needs, device, hessian) for fqn, m in targets.items()}
    handles = []
    try:
        for fqn, module in targets.items():
            c = collectors[fqn]
            handles.append(module.register_forward_hook(lambda _m, inp, _out, c=c: c.update(inp[0])))
        yield collectors
    finally:
        for h in handles:
            h.remove()


def hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks attached anywhere in ``model``; the engine must leave it unchanged."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
