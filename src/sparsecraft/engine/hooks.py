"""Forward hooks owned by context managers: they are removed in ``finally``, whatever happens."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sparsecraft.engine.blocks import weight_2d
from sparsecraft.stats import Hessian, InputSqNorm


class LayerCollector:
    """The statistics one layer's method asks for, plus what the reconstruction error needs.

    Input norms are always collected (cheap, O(in) per token): they give Wanda its score and every other method a
    diagonal estimate of the reconstruction error. The full Hessian (O(in^2) per token) only when the method needs
    it, or when ``hessian=True`` asks for the exact error.
    """

    def __init__(self, module: nn.Module, fqn: str, needs: tuple[str, ...], device: torch.device | str,
                 hessian: bool = False) -> None:
        features = weight_2d(module).shape[1]
        self.fqn = fqn
        self.sqnorm = InputSqNorm(features)
        self.hessian = Hessian(features, device) if hessian or "hessian" in needs else None
        self.checked = False  # statistics checked finite (once per collector, shared by q/k/v)

    def update(self, x: torch.Tensor) -> None:
        self.sqnorm.update(x)
        if self.hessian is not None:
            self.hessian.update(x)


class _SharedInputs:
    """Layers fed the very same input tensor (q/k/v of attention; gate/up of a gated MLP) share one collector:
    one Hessian instead of three. Decided on the first batch by tensor identity with the previous layer's input,
    and checked on every later batch."""

    def __init__(self, collectors: dict[str, LayerCollector]) -> None:
        self.collectors = collectors
        self.owner: dict[str, str] = {}  # fqn -> fqn whose collector it uses
        self.last: tuple[torch.Tensor, str] | None = None

    def update(self, fqn: str, x: torch.Tensor) -> None:
        same = self.last is not None and self.last[0] is x
        if fqn not in self.owner:
            can_share = same and self._compatible(self.last[1], fqn)  # type: ignore[index]
            self.owner[fqn] = self.owner[self.last[1]] if can_share else fqn  # type: ignore[index]
            if can_share:
                self.collectors[fqn] = self.collectors[self.owner[fqn]]
        owner = self.owner[fqn]
        if owner == fqn:
            self.collectors[fqn].update(x)
        elif not (same and self.owner[self.last[1]] == owner):  # type: ignore[index]
            raise RuntimeError(f"{fqn} shared its input with {owner} on the first batch but not on a later one; "
                               f"report this model to sparsecraft")
        self.last = (x, fqn)

    def _compatible(self, a: str, b: str) -> bool:
        ca, cb = self.collectors[a], self.collectors[b]
        return (ca.sqnorm.sum.shape == cb.sqnorm.sum.shape
                and (ca.hessian is None) == (cb.hessian is None))


@contextmanager
def collect_inputs(targets: dict[str, nn.Module], needs: tuple[str, ...], device: torch.device | str,
                   hessian: bool = False) -> Iterator[dict[str, LayerCollector]]:
    """Attach one input-statistics hook per target; yield the collectors (fqn -> collector; layers that read the
    same input map to the same collector once the first batch ran); always remove the hooks."""
    collectors = {fqn: LayerCollector(m, fqn, needs, device, hessian) for fqn, m in targets.items()}
    shared = _SharedInputs(collectors)
    handles = []
    try:
        for fqn, module in targets.items():
            handles.append(module.register_forward_hook(lambda _m, inp, _out, f=fqn: shared.update(f, inp[0])))
        yield collectors
    finally:
        for h in handles:
            h.remove()


def hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks attached anywhere in ``model``; the engine must leave it unchanged."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
