"""Streaming statistics of the inputs of every Linear in the blocks: log-histograms of |x| and of WINA's score.

A histogram over log2 values is the accumulator because it streams (memory O(bins) per layer, whatever the number of
calibration tokens) and answers every question this package asks from one pass: the threshold for ANY target
sparsity (a quantile), the fraction of near-zero inputs, and quantiles for the report. With 64 bins per octave and
linear interpolation inside a bin, a threshold read from it realizes its target within a few hundredths of a
percentage point on the data it was built from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG2_LO, LOG2_HI, BINS = -40.0, 24.0, 4096  # |x| from ~1e-12 to ~1.7e7, 64 bins per octave


class LogHistogram:
    """Counts of log2(v) for v >= 0 over fixed bins; v below 2**LOG2_LO (including exact zeros) land in bin 0."""

    def __init__(self) -> None:
        self.counts = torch.zeros(BINS, dtype=torch.float64)
        self.zeros = 0  # exact zeros, kept apart: a threshold of 0 already removes them

    def update(self, v: torch.Tensor) -> None:
        v = v.detach().reshape(-1).float()
        self.zeros += int((v == 0).sum())
        logs = torch.log2(v.clamp_min(2.0**LOG2_LO)).clamp_(LOG2_LO, LOG2_HI - 1e-6)
        self.counts += torch.histc(logs, BINS, LOG2_LO, LOG2_HI).double()

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        """The value t with a fraction q of the mass at or below it (log-linear inside a bin); q=0 -> 0."""
        if self.total == 0:
            raise ValueError("no calibration tokens reached this layer; pass a non-empty calibration set")
        if q <= 0.0:
            return 0.0
        target = q * self.total
        if target <= self.zeros:
            return 0.0
        cdf = torch.cumsum(self.counts, 0)
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64)).item())
        i = min(i, BINS - 1)
        below = float(cdf[i - 1]) if i > 0 else 0.0
        if i == 0:  # bin 0 mixes exact zeros and tiny values: interpolate only over its non-zero part
            below = float(self.zeros)
        frac = (target - below) / max(float(cdf[i]) - below, 1e-12)
        width = (LOG2_HI - LOG2_LO) / BINS
        return 2.0 ** (LOG2_LO + (i + min(max(frac, 0.0), 1.0)) * width)

    def fraction_below(self, t: float) -> float:
        """Fraction of the mass at or below t (the sparsity a threshold t realizes on this data)."""
        if t <= 0.0:
            return self.zeros / max(self.total, 1)
        pos = (min(max(math.log2(t), LOG2_LO), LOG2_HI) - LOG2_LO) / (LOG2_HI - LOG2_LO) * BINS
        i = min(int(pos), BINS - 1)
        cdf = float(self.counts[:i].sum()) + (pos - i) * float(self.counts[i])
        return cdf / max(self.total, 1)


class InputStats:
    """Everything measured about one Linear's input: histograms of |x| and |x_j|*||W[:, j]||, RMS, lazy channels."""

    def __init__(self, col_norm: torch.Tensor, mlp_down: bool) -> None:
        self.col_norm = col_norm.detach().float().cpu()  # (in,) ||W[:, j]||_2, WINA's weight factor
        self.abs = LogHistogram()
        self.wina = LogHistogram()
        self.sumsq = 0.0
        self.count = 0
        self.mlp_down = mlp_down  # inputs of the MLP's down projection: the "lazy neuron" view
        self.channel_abs = torch.zeros_like(self.col_norm, dtype=torch.float64)  # (in,) sum over tokens of |x_j|
        self.top10_mass = 0.0  # sum over tokens of (L1 mass of the top 10% channels / total L1 mass)

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).float().abs().cpu()  # (tokens, in)
        self.abs.update(a)
        self.wina.update(a * self.col_norm)
        self.sumsq += float(a.double().pow(2).sum())
        self.count += a.numel()
        self.channel_abs += a.sum(0).double()
        if self.mlp_down:
            k = max(1, a.shape[1] // 10)
            top = a.topk(k, dim=1).values.sum(1)  # (tokens,)
            self.top10_mass += float((top / a.sum(1).clamp_min(1e-30)).sum())

    @property
    def tokens(self) -> int:
        return self.count // max(self.col_norm.numel(), 1)

    def summary(self, fqn: str, eps: float = 0.01) -> LayerSummary:
        rms = math.sqrt(self.sumsq / max(self.count, 1))
        mean = self.channel_abs / max(self.tokens, 1)  # (in,)
        lazy = float((mean < 0.1 * mean.mean()).float().mean())
        return LayerSummary(
            fqn=fqn, features=self.col_norm.numel(), tokens=self.tokens, rms=rms,
            near_zero=self.abs.fraction_below(eps * rms), near_zero_eps=eps,
            quantiles={q: self.abs.quantile(q) for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)},
            lazy_channels=lazy,
            top10_mass=self.top10_mass / max(self.tokens, 1) if self.mlp_down else None,
        )


@dataclass(frozen=True)
class LayerSummary:
    """Report row for one Linear input. ``near_zero``: fraction of |x| <= near_zero_eps * RMS(x).

    ``lazy_channels``: fraction of input channels whose mean |x_j| is below a tenth of the layer's mean (neurons that
    rarely fire). ``top10_mass``: for MLP down-projection inputs, the mean over tokens of the share of the L1 mass
    carried by the largest 10% of the channels (1.0 = all mass in 10% of the neurons; 0.1 = spread evenly).
    """

    fqn: str
    features: int
    tokens: int
    rms: float
    near_zero: float
    near_zero_eps: float
    quantiles: dict[float, float]
    lazy_channels: float
    top10_mass: float | None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["quantiles"] = {str(k): v for k, v in self.quantiles.items()}
        return d
