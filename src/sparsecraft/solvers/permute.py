"""Input-channel permutation for N:M masks (RIA, Zhang et al. ICLR 2024, Sec. 4: channel reallocation + linear sum
assignment).

An N:M mask keeps the n best of every m CONSECUTIVE input channels. If several strong channels share a group, some
must go; permuting the channels first (and applying the same permutation where they are produced, so the network
computes the same function: engine/permute.py) lets each group mix strong and weak ones. The objective is the
retained score: the sum over rows and groups of the n largest scores in the group.

1. Reallocation: sort channels by total score, deal them to the in/m groups in snake order (0..B-1, B-1..0, ...).
2. Refinement, for each slot s = 0..m-1 of a group: take out the channel at slot s of every group and re-assign the
   B channels to the B groups optimally. Putting channel c into group b (whose other m-1 channels are fixed) retains
   top_n(rest_b) + sum_i max(0, S_ic - t_ib) where t_ib is the n-th largest of rest_b in row i, so the gain matrix is
   (B, B) and the assignment is a linear sum assignment: scipy's Hungarian solver when scipy is installed, else a
   greedy (best gain first). Either is only accepted when it does not lower the retained score.
"""

from __future__ import annotations

import torch

from sparsecraft.patterns import NM


def nm_retained(score: torch.Tensor, pattern: NM, perm: torch.Tensor | None = None) -> float:
    """Sum over rows and groups of the n largest of ``score[:, perm]`` (out, in) in each group of m columns."""
    s = score if perm is None else score[:, perm]
    groups = s.float().reshape(s.shape[0], -1, pattern.m)  # (out, B, m)
    return float(groups.topk(pattern.n, dim=2).values.double().sum())


def reallocate(score: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Snake-order dealing of channels sorted by total score -> perm (in,): position p holds channel perm[p]."""
    cols = score.shape[1]
    B = cols // pattern.m
    order = torch.argsort(score.double().sum(0), descending=True, stable=True)  # (in,)
    k = torch.arange(cols)
    rnd, pos = k // B, k % B
    group = torch.where(rnd % 2 == 0, pos, B - 1 - pos)  # snake
    perm = torch.empty(cols, dtype=torch.long)
    perm[group * pattern.m + rnd] = order
    return perm


def assignment(gain: torch.Tensor) -> torch.Tensor:
    """gain (B, B): candidate x group -> group of each candidate (B,), maximising the total gain."""
    try:
        from scipy.optimize import linear_sum_assignment  # optional: exact Hungarian solver
    except ImportError:
        return greedy_assignment(gain)
    rows, cols = linear_sum_assignment(gain.double().numpy(), maximize=True)
    out = torch.empty(gain.shape[0], dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return out


def greedy_assignment(gain: torch.Tensor) -> torch.Tensor:
    """Best remaining (candidate, group) pair first; ties to the lower flat index. (B,) group per candidate."""
    B = gain.shape[0]
    order = torch.argsort(gain.flatten(), descending=True, stable=True).tolist()
    out = [-1] * B
    taken = [False] * B
    left = B
    for idx in order:
        c, b = divmod(idx, B)
        if out[c] < 0 and not taken[b]:
            out[c], taken[b] = b, True
            left -= 1
            if left == 0:
                break
    return torch.tensor(out, dtype=torch.long)


def slot_gain(score: torch.Tensor, perm: torch.Tensor, pattern: NM, slot: int, chunk: int = 32) -> torch.Tensor:
    """(B, B) gain of putting the slot-``slot`` channel of group c into group b (other slots fixed)."""
    s = score[:, perm].float()
    out, cols = s.shape
    B = cols // pattern.m
    groups = s.reshape(out, B, pattern.m)
    others = torch.cat([groups[:, :, :slot], groups[:, :, slot + 1:]], dim=2)  # (out, B, m-1)
    if pattern.n > pattern.m - 1:  # n == m: every channel is kept anyway
        return torch.zeros(B, B)
    t = others.topk(pattern.n, dim=2).values[:, :, -1]  # (out, B) n-th largest of the rest
    cand = groups[:, :, slot]  # (out, B) candidate channels
    gain = torch.empty(B, B)
    for c0 in range(0, B, chunk):
        c1 = min(c0 + chunk, B)
        gain[c0:c1] = (cand[:, c0:c1, None] - t[:, None, :]).clamp_min(0).sum(0)  # (chunk, B)
    return gain


def channel_permutation(score: torch.Tensor, pattern: NM, rounds: int = 1) -> torch.Tensor:
    """score (out, in), higher = keep -> perm (in,) maximising the N:M retained score; identity if nothing helps.
    Pure."""
    if not isinstance(pattern, NM) or score.shape[1] % pattern.m:
        raise ValueError(f"channel permutation needs an N:M pattern whose m divides the input width; got {pattern} "
                         f"for {score.shape[1]} inputs")
    s = score.detach().float().cpu()
    identity = torch.arange(s.shape[1])
    best, best_val = identity, nm_retained(s, pattern)
    perm = reallocate(s, pattern)
    for _ in range(rounds):
        for slot in range(pattern.m):
            groups = perm.reshape(-1, pattern.m)  # (B, m) channel at each slot of each group
            to = assignment(slot_gain(s, perm, pattern, slot))  # (B,) new group of each slot channel
            if int((to == torch.arange(len(to))).sum()) == len(to):
                continue
            new = groups.clone()
            new[to, slot] = groups[:, slot]
            if nm_retained(s, pattern, new.flatten()) >= nm_retained(s, pattern, perm):
                perm = new.flatten()
    val = nm_retained(s, pattern, perm)
    return perm if val > best_val else best
