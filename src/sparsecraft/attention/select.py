"""Which cached tokens to keep: budgets, per-layer and per-head allocation, top-k with forced sinks and window,
and KVMerger-style merging of adjacent similar keys (pure functions; inputs are never modified).

Counting rule: a budget below or equal to 1 is a fraction of the prompt's n tokens, kept = round(budget * n); a
budget above 1 is a token count. Every head of a layer then keeps exactly ``count`` slots (uniform heads), or the
layer keeps exactly ``count * Hkv`` slots split unevenly between its heads (adaptive heads). Ties in a score go to
the earlier token (stable sort), so selections are reproducible.
"""

from __future__ import annotations

import math

import torch


def budget_count(n: int, budget: float) -> int:
    """Tokens a head keeps out of ``n`` for a fraction (<= 1) or a token count (> 1); at most n."""
    if budget <= 0:
        raise ValueError(f"budget must be > 0 (a fraction in (0, 1] or a token count > 1), got {budget}")
    count = round(budget * n) if budget <= 1 else int(budget)
    return max(1, min(n, count))


def layer_counts(count: int, n_layers: int, kind: str, n: int) -> list[int]:
    """Per-layer token counts with mean ``count``. "uniform": every layer the same; "pyramid" (PyramidKV,
    arxiv.org/abs/2406.02069): linear from 1.5x at the first layer to 0.5x at the last, exact total by largest
    remainder, each clamped to [1, n] (the clamp can only lower the total)."""
    if kind == "uniform" or n_layers == 1:
        return [count] * n_layers
    if kind != "pyramid":
        raise ValueError(f"unknown layer allocation {kind!r}; use 'uniform' or 'pyramid'")
    weights = [1.5 - i / (n_layers - 1) for i in range(n_layers)]  # mean 1.0
    raw = [count * w for w in weights]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(n_layers), key=lambda i: counts[i] - raw[i])  # largest remainder first
    for i in order[: count * n_layers - sum(counts)]:
        counts[i] += 1
    return [max(1, min(n, c)) for c in counts]


def forced(valid: torch.Tensor, sinks: int, window: int, count: int) -> torch.Tensor:
    """Positions always kept -> (B, n) bool: the first ``sinks`` real tokens of each row (attention sinks,
    StreamingLLM) and its last ``window`` real tokens, shrunk (window first) so that they fit in ``count``.
    valid (B, n) bool: which keys are real tokens (left padding is not, so a padded row's sinks are its text)."""
    s = min(sinks, count)
    w = min(window, count - s)
    before = valid.long().cumsum(-1)                   # real tokens up to and including each position
    after = valid.long().flip(-1).cumsum(-1).flip(-1)  # real tokens from each position to the end
    return valid & ((before <= s) | (after <= w))


def _rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim by descending score, ties to the earlier index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def topk_keep(scores: torch.Tensor, count: int, must: torch.Tensor) -> torch.Tensor:
    """Per head, the ``count`` best tokens with ``must`` (B, n) forced -> keep (B, H, n) bool, exactly count each."""
    s = scores.float().masked_fill(must[:, None], float("inf"))
    idx = _rank_desc(s)[..., :count]
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)


def adaptive_keep(scores: torch.Tensor, count: int, must: torch.Tensor) -> torch.Tensor:
    """Per layer, ``count * H`` slots shared by the heads (AdaKV, arxiv.org/abs/2407.11550): forced tokens in every
    head, then the best remaining scores across all heads of the layer -> keep (B, H, n); per-head counts vary,
    the layer total is exact. Attention probabilities sum to 1 per query, so scores compare across heads."""
    B, H, n = scores.shape
    s = scores.float().masked_fill(must[:, None], float("inf")).reshape(B, H * n)
    idx = _rank_desc(s)[:, : count * H]
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True).view(B, H, n)


def keep_to_slots(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (B, H, n) -> (index (B, H, L), filled (B, H, L)) with L the largest per-head count; kept tokens stay in
    order; a head with fewer tokens gets trailing empty slots (index 0, filled False) that attention masks out."""
    n = keep.shape[-1]
    ar = torch.arange(n, device=keep.device)
    order = torch.sort(torch.where(keep, ar, ar + n), dim=-1).indices  # kept first, in position order
    L = int(keep.sum(dim=-1).max())
    index = order[..., :L]
    filled = keep.gather(-1, index)
    return index.masked_fill(~filled, 0), filled


def merge_adjacent(keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, count: int,
                   must: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """KVMerger-style (Wang et al. 2024, arxiv.org/abs/2407.08454) merging to exactly ``count`` slots per head.

    Forced tokens stay alone; the others form runs between forced ones. Per head, cut the runs at the adjacent key
    pairs of lowest cosine similarity until there are ``count`` groups; each group becomes one slot whose key and
    value are the ``weights``-weighted mean of its members (weights: attention the token received; the heaviest
    member dominates, as KVMerger's pivot). ``log_size`` = log(members) is added to the slot's attention logit so a
    merged slot draws about the attention its members drew together (the ToMe proportional-attention trick).
    Padding (``valid`` False) never shares a slot with a real token: it is cut off from the text and kept in one
    slot when the budget allows (a slot the attention mask then hides).
    keys, values (B, H, n, D); weights (B, H, n) >= 0; must, valid (B, n) bool. Returns keys, values
    (B, H, count, D), position (B, H, count) = latest member, log_size (B, H, count).
    """
    B, H, n, D = keys.shape
    dev = keys.device
    valid = torch.ones(B, n, dtype=torch.bool, device=dev) if valid is None else valid
    k = keys.float()
    sim = torch.nn.functional.cosine_similarity(k[:, :, 1:], k[:, :, :-1], dim=-1)  # (B, H, n-1): pair (i, i+1)
    # a boundary before token i+1 is forced where either side is forced, or where padding meets text
    pair_forced = must[:, 1:] | must[:, :-1] | (valid[:, 1:] != valid[:, :-1])  # (B, n-1)
    if int(pair_forced.sum(-1).max()) > count - 1:
        raise ValueError(f"merge budget {count} is smaller than the forced sinks + window; lower sinks/window")
    both_pad = ~valid[:, 1:] & ~valid[:, :-1]
    s = sim.masked_fill(both_pad[:, None], float("inf")).masked_fill(pair_forced[:, None], float("-inf"))
    cut_idx = torch.sort(s, dim=-1, stable=True).indices[..., : count - 1]  # forced pairs sort first (-inf)
    cut = torch.zeros(B, H, n - 1, dtype=torch.bool, device=dev).scatter_(-1, cut_idx, True)
    group = torch.cat([torch.zeros(B, H, 1, dtype=torch.long, device=dev), cut.long().cumsum(-1)], dim=-1)  # (B,H,n)
    w = weights.float().clamp_min(0) + 1e-6
    wsum = torch.zeros(B, H, count, device=dev).scatter_add_(-1, group, w)
    gk = group[..., None].expand(B, H, n, D)
    mk = torch.zeros(B, H, count, D, device=dev).scatter_add_(2, gk, w[..., None] * k)
    mv = torch.zeros(B, H, count, D, device=dev).scatter_add_(2, gk, w[..., None] * values.float())
    size = torch.zeros(B, H, count, device=dev).scatter_add_(-1, group, torch.ones_like(w))
    pos = torch.arange(n, device=dev).expand(B, H, n)
    position = torch.zeros(B, H, count, dtype=torch.long, device=dev).scatter_reduce_(-1, group, pos, "amax")
    return {"keys": (mk / wsum[..., None]).to(keys.dtype), "values": (mv / wsum[..., None]).to(values.dtype),
            "position": position, "log_size": size.log()}
