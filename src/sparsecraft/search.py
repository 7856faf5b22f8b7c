"""EvoPress-style search of per-layer sparsity (Sieberling et al. 2024, arXiv:2410.14649): per-block levels,
scored by the KL divergence of the candidate model's next-token distribution to the dense model's.

Candidates use Wanda masks from dense input statistics (``score_ranks`` makes every level an O(1) lookup); every plan is
made exact by ``allocation.shifted``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sparsecraft.allocation import shifted
from sparsecraft.engine.blocks import set_weight_2d_, weight_2d
from sparsecraft.methods.wanda import wanda_score
from sparsecraft.patterns import Pattern, split_counts


def score_ranks(weights: Mapping[str, torch.Tensor], sqnorms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fqn -> (out, in) int32 rank of each weight within its row by ascending Wanda score (ties: lower index first),
    so that ``rank >= count`` is the engine's row-wise Wanda mask for any sparsity (a level "database" in O(1))."""
    ranks = {}
    for fqn, w in weights.items():
        order = torch.sort(wanda_score(w, sqnorms[fqn]), dim=1, stable=True).indices  # (out, in)
        r = torch.empty_like(order, dtype=torch.int32)
        r.scatter_(1, order, torch.arange(w.shape[1], dtype=torch.int32).expand(w.shape[0], -1).contiguous())
        ranks[fqn] = r
    return ranks


@torch.no_grad()
def apply_ranked_plan_(layers: Mapping[str, nn.Module], dense: Mapping[str, torch.Tensor],
                       ranks: Mapping[str, torch.Tensor], plan: Mapping[str, float]) -> None:
    """In place: every layer in ``plan`` gets its dense weight masked at its planned sparsity (row-wise, exact
    counts as the engine's Wanda); layers absent from ``plan`` get their dense weight back."""
    for fqn, module in layers.items():
        w = dense[fqn]
        if fqn in plan and plan[fqn] > 0:
            counts = split_counts(w.numel(), w.shape[0], plan[fqn])  # (out,)
            w = w * (ranks[fqn] >= counts.unsqueeze(1))
        set_weight_2d_(module, w)


@torch.no_grad()
def token_logprobs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n, T) token ids -> (n, T, V) float32 log-probabilities."""
    device = next(model.parameters()).device
    outs = [torch.log_softmax(model(input_ids=b.to(device), use_cache=False).logits.float(), -1).cpu()
            for b in windows.split(batch_size)]
    return torch.cat(outs)


def kl_to_dense(model: nn.Module, windows: torch.Tensor, ref: torch.Tensor, batch_size: int) -> float:
    """Mean per-token KL(dense || model) over ``windows``; ``ref`` = the dense model's log-probabilities."""
    logp = token_logprobs(model, windows, batch_size)
    return float((ref.exp() * (ref - logp)).sum(-1).mean())


def search_layer_sparsity(model: nn.Module, layers: Mapping[str, nn.Module], groups: Mapping[str, str],
                sqnorms: Mapping[str, torch.Tensor], calibration: torch.Tensor, target: float, pattern: Pattern, *,
                seed: int = 0, batch_size: int = 8, min_sparsity: float = 0.0, max_sparsity: float = 0.99,
                generations: int = 16, offspring: int = 6, survivors: int = 2, step: float = 0.04,
                max_levels: int = 5, fitness_windows: int = 4, fitness_tokens: int = 256) -> dict[str, float]:
    """(1 + lambda) evolution over per-block offsets k_b (sparsity_b = target + k_b * step, |k_b| <= max_levels).

    A mutation moves one block up one level and another down one (the total is preserved for equal-size blocks;
    ``shifted`` makes every plan exact anyway). Offspring are scored on the first fitness window, the best
    ``survivors`` on all ``fitness_windows`` (EvoPress' multi-step selection); the parent is replaced only by a
    better child. Candidates use Wanda masks from dense statistics. Budget: about ``generations * (offspring /
    fitness_windows + survivors)`` forward passes over the fitness set. Deterministic for a seed. The model's
    weights are restored before returning.
    """
    if not isinstance(calibration, torch.Tensor) or calibration.ndim != 2:
        raise ValueError("allocation 'search' needs calibration token ids as one (n, seqlen) tensor")
    if min(generations, offspring, survivors, max_levels, fitness_windows, fitness_tokens) < 1 or step <= 0:
        raise ValueError("search options generations, offspring, survivors, max_levels, fitness_windows, "
                         "fitness_tokens must be >= 1 and step > 0")
    shapes = {f: tuple(weight_2d(m).shape) for f, m in layers.items()}
    blocks = sorted(set(groups.values()), key=list(groups.values()).index)
    windows = calibration[-fitness_windows:, :fitness_tokens]  # (w, t): the calibration set's last windows
    dense = {f: weight_2d(m).detach().clone() for f, m in layers.items()}
    ranks = score_ranks(dense, sqnorms)
    rng = torch.Generator().manual_seed(seed)

    def plan_of(levels: tuple[int, ...]) -> dict[str, float]:
        base = {f: target + levels[blocks.index(groups[f])] * step for f in layers}
        return shifted(base, shapes, target, pattern, min_sparsity, max_sparsity)

    def fitness(levels: tuple[int, ...], w: torch.Tensor, ref: torch.Tensor) -> float:
        apply_ranked_plan_(layers, dense, ranks, plan_of(levels))
        return kl_to_dense(model, w, ref, batch_size)

    try:
        ref_all = token_logprobs(model, windows, batch_size)
        parent = tuple(0 for _ in blocks)
        best = fitness(parent, windows, ref_all)
        for _ in range(generations):
            children = [_mutate(parent, max_levels, rng) for _ in range(offspring)]
            quick = sorted(((fitness(c, windows[:1], ref_all[:1]), i) for i, c in enumerate(children)))
            for _, i in quick[:survivors]:
                score = fitness(children[i], windows, ref_all)
                if score < best:
                    parent, best = children[i], score
    finally:
        apply_ranked_plan_(layers, dense, ranks, {})
    return plan_of(parent)


def _mutate(levels: tuple[int, ...], max_levels: int, rng: torch.Generator) -> tuple[int, ...]:
    """Move 1-3 random (up, down) pairs of blocks by one level each, within +-max_levels."""
    out = list(levels)
    n = len(out)
    for _ in range(int(torch.randint(1, 4, (1,), generator=rng))):
        up, down = torch.randperm(n, generator=rng)[:2].tolist() if n > 1 else (0, 0)
        if up != down and out[up] < max_levels and out[down] > -max_levels:
            out[up] += 1
            out[down] -= 1
    return tuple(out)
