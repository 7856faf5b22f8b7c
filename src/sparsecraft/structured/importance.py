"""Importance of every structure (score, higher = keep), as pure functions of weights and calibration statistics.

Every method scores *channels* of the layers a structure spans, then sums them per structure:

| method | consumer column c of W (out, in), input x | producer row r of W |
|---|---|---|
| ``magnitude`` (Torch-Pruning group L2, squared) | sum_i W_ic^2 | sum_j W_rj^2 |
| ``magnitude-l1`` | sum_i abs(W_ic) | sum_j abs(W_rj) |
| ``wanda`` (Sun et al. 2023, summed per structure) | sum_i abs(W_ic) * norm(x_c) | sum_j abs(W_rj) * norm(x_j) |
| ``activation`` (Minitron, Muralidharan et al. 2024) | mean over tokens of abs(x_c) | 0 |
| ``flap`` (An et al. 2024, fluctuation, eq. 5) | var(x_c) * sum_i W_ic^2 | 0 |

``activation`` and ``flap`` look only at what the structure outputs (the consumer's input), as in their papers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparsecraft.structured.stats import ChannelStats

ColumnScore = Callable[[torch.Tensor, ChannelStats | None], torch.Tensor]


def _need(x: ChannelStats | None, method: str) -> ChannelStats:
    if x is None or x.n == 0:
        raise ValueError(f"method {method!r} needs calibration activations; pass calibration windows")
    return x


# method -> (column score (in,), row score (out,)); W is (out, in) float64
METHODS: dict[str, tuple[ColumnScore, ColumnScore]] = {
    "magnitude": (lambda W, x: W.pow(2).sum(0), lambda W, x: W.pow(2).sum(1)),
    "magnitude-l1": (lambda W, x: W.abs().sum(0), lambda W, x: W.abs().sum(1)),
    "wanda": (lambda W, x: (W.abs() * _need(x, "wanda").norm[None, :]).sum(0),
              lambda W, x: (W.abs() * _need(x, "wanda").norm[None, :]).sum(1)),
    "activation": (lambda W, x: _need(x, "activation").mean_abs, lambda W, x: W.new_zeros(W.shape[0])),
    "flap": (lambda W, x: _need(x, "flap").var * W.pow(2).sum(0), lambda W, x: W.new_zeros(W.shape[0])),
}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown structured method {method!r}; choose one of {', '.join(METHODS)}")


def column_scores(method: str, W: torch.Tensor, x: ChannelStats | None) -> torch.Tensor:
    """W (out, in) -> (in,) float64 score per input column."""
    check_method(method)
    return METHODS[method][0](W.detach().double().cpu(), x)


def row_scores(method: str, W: torch.Tensor, x: ChannelStats | None) -> torch.Tensor:
    """W (out, in), x = statistics of W's input -> (out,) float64 score per output row."""
    check_method(method)
    return METHODS[method][1](W.detach().double().cpu(), x)


def per_unit(scores: torch.Tensor, unit_size: int) -> torch.Tensor:
    """(U * unit_size,) channel scores -> (U,) sums over consecutive runs of ``unit_size`` channels."""
    return scores.reshape(-1, unit_size).sum(1)


def keep_top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (sorted ascending) of the ``k`` highest scores; ties keep the lower index."""
    if not 1 <= k <= score.numel():
        raise ValueError(f"cannot keep {k} of {score.numel()} structures; keep between 1 and {score.numel()}")
    order = torch.argsort(-score, stable=True)
    return order[:k].sort().values


def block_influence(mean_cos: torch.Tensor) -> torch.Tensor:
    """ShortGPT (Men et al. 2024): BI_i = 1 - E[cos(x_i, x_{i+1})] per block, (L+1, L+1) -> (L,). Low BI = the block
    barely changes the residual stream = the first to go."""
    return 1 - torch.diagonal(mean_cos, offset=1)


def angular_run(mean_cos: torch.Tensor, n: int) -> int:
    """Gromov et al. 2024: the start l of the run of ``n`` consecutive blocks whose input x_l and output x_{l+n} are
    closest in angle, arccos(E[cos]) / pi. Ties go to the later run (deep blocks are the usual redundant ones)."""
    L = mean_cos.shape[0] - 1
    if not 1 <= n <= L - 1:
        raise ValueError(f"cannot remove {n} of {L} blocks; remove between 1 and {L - 1}")
    d = torch.stack([torch.arccos(mean_cos[l, l + n].clamp(-1, 1)) / torch.pi for l in range(L - n + 1)])
    return int(len(d) - 1 - torch.argmin(d.flip(0)))


def blocks_to_drop(mean_cos: torch.Tensor, n: int, method: str) -> list[int]:
    """Indices of the ``n`` blocks to remove, by ``block-influence`` or ``angular``."""
    if n == 0:
        return []
    if method == "block-influence":
        bi = block_influence(mean_cos)
        return sorted(torch.argsort(bi, stable=True)[:n].tolist())
    if method == "angular":
        start = angular_run(mean_cos, n)
        return list(range(start, start + n))
    raise ValueError(f"unknown depth method {method!r}; choose block-influence or angular")
