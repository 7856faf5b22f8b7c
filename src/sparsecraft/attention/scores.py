"""Attention scores for KV-cache selection, computed from post-RoPE queries and cached keys (pure functions).

Shapes: B batch, Hq query heads, Hkv key/value heads (Hq = G * Hkv, grouped-query attention), n keys, w observed
queries, D head dim. ``allowed`` is a boolean mask (B or 1, 1, rows, n), True = the query may attend that key
(causality and padding), as the model's own attention mask says; None means plain causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, n, D) -> (B, Hkv * groups, n, D); query head h reads key head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def group_mean(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hq, n) -> (B, Hkv, n): a key head's score is the mean over the query heads that read it."""
    B, Hq, n = scores.shape
    return scores.view(B, Hq // groups, groups, n).mean(dim=2)


def causal_allowed(rows: int, n: int, device: torch.device) -> torch.Tensor:
    """The last ``rows`` queries of an n-token causal prefill -> (1, 1, rows, n) bool."""
    q_pos = torch.arange(n - rows, n, device=device)[:, None]
    return (torch.arange(n, device=device)[None, :] <= q_pos)[None, None]


def as_allowed(mask: torch.Tensor | None, rows: slice, n_q: int, n: int, device: torch.device) -> torch.Tensor:
    """Rows of the model's 4-D mask (bool True = attend, or additive float 0 = attend) -> bool (B|1, 1, r, n)."""
    if mask is None:
        return causal_allowed(n_q, n, device)[:, :, rows]
    m = mask[:, :, rows, -n:]
    return m if m.dtype == torch.bool else m == 0


def attention_probs(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling) over allowed keys: (B, Hq, r, D), (B, Hkv, n, D) -> (B, Hq, r, n), fp32."""
    k = repeat_kv(keys, query.shape[1] // keys.shape[1]).float()
    logits = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling  # (B, Hq, r, n)
    logits = logits.masked_fill(~allowed, float("-inf"))
    # a fully masked row (a padding query) would give NaN: it contributes nothing instead
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def window_scores(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, window: int,
                  scaling: float, pool: int) -> torch.Tensor:
    """SnapKV (Li et al. 2024, arxiv.org/abs/2404.14469): attention of the last ``window`` prompt queries, summed
    over them, average-pooled along the keys (kernel ``pool``, so neighbours of a hit survive), mean over the query
    heads of a group -> (B, Hkv, n)."""
    n_q, n = query.shape[2], keys.shape[2]
    w = min(window, n_q)
    allowed = as_allowed(mask, slice(n_q - w, n_q), n_q, n, query.device)
    probs = attention_probs(query[:, :, n_q - w:], keys, allowed, scaling).sum(dim=2)  # (B, Hq, n)
    if pool > 1:  # mean over the real keys of each neighbourhood (padding keys do not dilute the text's scores)
        B, Hq, _ = probs.shape
        real = key_valid(mask, B, n, query.device).float()[:, None].expand(B, Hq, n)
        pooled = [F.avg_pool1d(x.reshape(B * Hq, 1, n), pool, stride=1, padding=pool // 2, count_include_pad=False)
                  for x in (probs * real, real)]
        probs = (pooled[0] / pooled[1].clamp_min(1e-9)).reshape(B, Hq, n)
    return group_mean(probs, query.shape[1] // keys.shape[1])


def accumulated_scores(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                       chunk: int = 256) -> torch.Tensor:
    """H2O (Zhang et al. 2023, arxiv.org/abs/2306.14048): attention each key receives, summed over every prompt
    query, mean over the query heads of a group -> (B, Hkv, n). Queries run in chunks of ``chunk`` rows, so memory
    is O(chunk * n) per head rather than O(n^2)."""
    n_q, n = query.shape[2], keys.shape[2]
    total = torch.zeros(query.shape[0], query.shape[1], n, device=query.device)
    for start in range(0, n_q, chunk):
        rows = slice(start, min(start + chunk, n_q))
        allowed = as_allowed(mask, rows, n_q, n, query.device)
        seen = n - n_q + rows.stop  # keys after the chunk's last query are causal-masked: skip them (half the work)
        if allowed[..., seen:].any():
            seen = n
        total[..., :seen] += attention_probs(query[:, :, rows], keys[:, :, :seen], allowed[..., :seen],
                                             scaling).sum(dim=2)
    return group_mean(total, query.shape[1] // keys.shape[1])


def key_valid(mask: torch.Tensor | None, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """Which keys are real tokens (not padding) -> (B, n) bool: the last query row of the mask sees every real key."""
    if mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    last = mask[:, 0, -1, -n:]
    return (last if last.dtype == torch.bool else last == 0).expand(batch, n)
