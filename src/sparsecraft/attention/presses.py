"""The KV-cache compression methods ("presses") and their frozen config: one scoring rule each, one registry.

A press runs once per layer, right after the prompt's (prefill) attention, on the post-RoPE queries and the full
keys/values of that layer; it returns what the layer keeps. Decoding then appends to the compressed cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from sparsecraft.attention import scores as S
from sparsecraft.attention.select import (adaptive_keep, budget_count, forced, keep_to_slots, layer_counts,
                                          merge_adjacent, topk_keep)


@dataclass(frozen=True)
class KVConfig:
    method: str = "snapkv"     # a key of PRESSES
    budget: float = 0.25       # <= 1: fraction of the prompt's tokens kept per head; > 1: a token count
    sinks: int = 4             # first tokens always kept (attention sinks, arxiv.org/abs/2309.17453)
    window: int = 32           # last prompt tokens always kept; SnapKV's observation window; H2O's recent window
    pool: int = 7              # SnapKV / merge: average-pool kernel along the keys (odd)
    heads: str = "uniform"     # "uniform": every head keeps the same count; "adaptive": a layer's heads share it
    layers: str = "uniform"    # "uniform" or "pyramid" (more tokens in early layers, fewer in late ones)

    def __post_init__(self) -> None:
        if self.method not in PRESSES:
            raise ValueError(f"unknown KV method {self.method!r}; choose one of {sorted(PRESSES)}")
        if not self.budget > 0:
            raise ValueError(f"budget must be > 0: a fraction in (0, 1] or a token count > 1, got {self.budget}")
        if self.budget > 1 and self.budget != int(self.budget):
            raise ValueError(f"a budget above 1 is a token count and must be whole, got {self.budget}")
        if self.sinks < 0 or self.window < 0:
            raise ValueError(f"sinks and window must be >= 0, got {self.sinks} and {self.window}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd kernel size >= 1, got {self.pool}")
        if self.heads not in ("uniform", "adaptive"):
            raise ValueError(f"heads must be 'uniform' or 'adaptive', got {self.heads!r}")
        if self.layers not in ("uniform", "pyramid"):
            raise ValueError(f"layers must be 'uniform' or 'pyramid', got {self.layers!r}")
        if self.heads == "adaptive" and self.method in ("streaming", "merge"):
            raise ValueError(f"heads='adaptive' needs scores that compare across heads; {self.method!r} keeps the "
                             f"same positions (or group counts) per head: use heads='uniform'")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Kept:
    """What a layer keeps: keys/values (B, Hkv, L, D); position (B, Hkv, L) index of each slot in the model's
    attention mask (-1 = empty slot); log_size (B, Hkv, L) logit bias of merged slots, or None."""
    keys: torch.Tensor
    values: torch.Tensor
    position: torch.Tensor
    log_size: torch.Tensor | None = None


# scorer(query, keys, mask, cfg, scaling) -> (B, Hkv, n), higher = keep
Scorer = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", KVConfig, float], torch.Tensor]


def _streaming(query, keys, mask, cfg, scaling):
    # StreamingLLM: sinks + the most recent tokens; a later position scores higher
    return torch.arange(keys.shape[2], device=keys.device, dtype=torch.float32).expand(*keys.shape[:3])


def _h2o(query, keys, mask, cfg, scaling):
    return S.accumulated_scores(query, keys, mask, scaling)


def _snapkv(query, keys, mask, cfg, scaling):
    return S.window_scores(query, keys, mask, cfg.window, scaling, cfg.pool)


PRESSES: dict[str, Scorer] = {"streaming": _streaming, "h2o": _h2o, "snapkv": _snapkv, "merge": _snapkv}


def layer_count(cfg: KVConfig, n: int, layer_idx: int, n_layers: int) -> int:
    """Slots per head this layer keeps of an n-token prompt (per the layer allocation)."""
    return layer_counts(budget_count(n, cfg.budget), n_layers, cfg.layers, n)[layer_idx]


def press(cfg: KVConfig, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
          mask: torch.Tensor | None, scaling: float, count: int) -> Kept | None:
    """Compress one layer's n cached tokens to ``count`` per head; None when nothing needs dropping.
    query (B, Hq, n_q, D) post-RoPE; keys, values (B, Hkv, n, D); mask: the model's 4-D mask of this pass."""
    B, n = keys.shape[0], keys.shape[2]
    if count >= n:
        return None
    valid = S.key_valid(mask, B, n, keys.device)  # (B, n): left padding is not a real token
    if cfg.method == "merge":
        # forced tokens are single slots with a cut on each side: leave one slot for the merged middle, and one
        # for the padding of a padded batch
        room = count - 1 - int(not bool(valid.all()))
        must = forced(valid, cfg.sinks, cfg.window, max(0, room))
        weights = PRESSES[cfg.method](query, keys, mask, cfg, scaling)
        m = merge_adjacent(keys, values, weights, count, must, valid)
        return Kept(m["keys"], m["values"], m["position"], m["log_size"])
    window = count - cfg.sinks if cfg.method == "streaming" else cfg.window
    must = forced(valid, cfg.sinks, window, count)  # (B, n)
    score = PRESSES[cfg.method](query, keys, mask, cfg, scaling)  # (B, Hkv, n)
    score = score.masked_fill(~valid[:, None], -1.0)  # padding keys score lowest: they go first
    keep = (adaptive_keep if cfg.heads == "adaptive" else topk_keep)(score, count, must)
    index, filled = keep_to_slots(keep)  # (B, Hkv, L)
    gather = index[..., None].expand(*index.shape, keys.shape[-1])
    return Kept(keys.gather(2, gather), values.gather(2, gather), index.masked_fill(~filled, -1))
