"""One calibration pass over the dense model: per-channel input statistics of the layers that own structures, and
the cosine similarity between every pair of block boundaries (for depth pruning).

Whole-model forwards with hooks (not the block driver): structured scores are computed once on the dense model, so
there is nothing to propagate, and the statistics are vectors (a few KB per layer). Hooks are removed in ``finally``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparsecraft.engine.blocks import find_blocks
from sparsecraft.structured.arch import ArchSpec


class ChannelStats:
    """Running per-channel moments of a layer's input x (…, C), in float64: count, sum, sum of squares, sum |x|."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.sumabs: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()  # (N, C)
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64)
            self.sumsq, self.sumabs = self.sum.clone(), self.sum.clone()
        self.n += x.shape[0]
        self.sum += x.sum(0).cpu()
        self.sumsq += x.pow(2).sum(0).cpu()
        self.sumabs += x.abs().sum(0).cpu()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def norm(self) -> torch.Tensor:
        """||X_c||_2 over every calibration token (Wanda's input norm)."""
        return self.sumsq.sqrt()

    @property
    def var(self) -> torch.Tensor:
        """Sample variance over tokens (FLAP's fluctuation); Bessel-corrected."""
        return ((self.sumsq - self.n * self.mean.pow(2)) / max(self.n - 1, 1)).clamp_min(0)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.sumabs / self.n


@dataclass
class Calibration:
    """Statistics keyed by full module fqn, plus boundary similarities: ``cos_sum[i, j] / tokens`` is the mean
    cosine similarity between the residual stream at boundary i and at boundary j (boundary i = input of block i,
    boundary L = output of the last block)."""

    inputs: dict[str, ChannelStats] = field(default_factory=dict)
    cos_sum: torch.Tensor | None = None  # (L+1, L+1) float64
    tokens: int = 0
    stream_cov: torch.Tensor | None = None  # (C, C) float64, sum of x^T x over boundaries (rotation only)

    def mean_cos(self) -> torch.Tensor:
        return self.cos_sum / max(self.tokens, 1)


def _stat_layers(spec: ArchSpec, prefix: str, n_blocks: int) -> list[str]:
    """Block layers whose inputs we record: the MLP consumer, the attention output, one reader of each norm."""
    names = [spec.mlp_out, spec.mlp_in[0]]
    if spec.q:
        names += [spec.o, spec.q]
    return [f"{prefix}.{i}.{n}" for i in range(n_blocks) for n in names]


@torch.no_grad()
def calibrate(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, batch_size: int = 4,
              stream_cov: bool = False) -> Calibration:
    """windows (n, T) token ids -> Calibration. ``stream_cov`` also sums x^T x of the residual stream at every
    block boundary (the PCA basis of the SliceGPT rotation)."""
    prefix, blocks = find_blocks(model)
    cal = Calibration()
    modules = dict(model.named_modules())
    handles = []
    boundary: list[torch.Tensor] = []

    def stat_hook(fqn: str):
        def hook(module: nn.Module, args: tuple) -> None:
            cal.inputs.setdefault(fqn, ChannelStats()).update(args[0])
        return hook

    def block_in(module: nn.Module, args: tuple, kwargs: dict) -> None:
        boundary.append((args[0] if args else kwargs["hidden_states"]).detach())

    def block_out(module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        boundary.append((out[0] if isinstance(out, (tuple, list)) else out).detach())

    try:
        for fqn in _stat_layers(spec, prefix, len(blocks)):
            handles.append(modules[fqn].register_forward_pre_hook(stat_hook(fqn)))
        for block in blocks:
            handles.append(block.register_forward_pre_hook(block_in, with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(block_out, with_kwargs=True))
        device = next(model.parameters()).device
        for batch in windows.split(batch_size):
            boundary.clear()
            model(input_ids=batch.to(device), use_cache=False)
            _add_boundaries(cal, boundary, stream_cov)
    finally:
        for h in handles:
            h.remove()
    return cal


def _add_boundaries(cal: Calibration, boundary: list[torch.Tensor], stream_cov: bool) -> None:
    """Accumulate the pairwise cosine similarities (per token) of the L+1 boundary states of one batch."""
    x = torch.stack([b.reshape(-1, b.shape[-1]).double() for b in boundary])  # (L+1, N, C)
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = torch.einsum("inc,jnc->ij", unit, unit).cpu()  # (L+1, L+1), summed over the N tokens
    cal.cos_sum = cos if cal.cos_sum is None else cal.cos_sum + cos
    cal.tokens += x.shape[1]
    if stream_cov:
        flat = x.reshape(-1, x.shape[-1])  # ((L+1) N, C)
        cov = (flat.T @ flat).cpu()
        cal.stream_cov = cov if cal.stream_cov is None else cal.stream_cov + cov
