"""A transformers ``Cache`` whose layers compress their prompt once and then grow by decoding.

The model sees a cache that has "seen" every token: ``get_seq_length`` and ``get_mask_sizes`` count all tokens ever
appended, so position ids and the model's attention mask keep their full, true length. Each layer remembers for
each kept slot which mask column it came from (``position``); the attention wrapper (sparsecraft.attention.wrap)
gathers those columns, so padding and causality stay exactly as the model meant, layer by layer and head by head.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from sparsecraft.attention.presses import KVConfig, layer_count, press

# the key under which a layer announces itself to the attention function, through the attention kwargs that the
# model hands both to Cache.update (as kwargs=...) and to the attention function
LAYER_KWARG = "sparsecraft_kv_layer"


class KVLayer(DynamicLayer):
    """A DynamicLayer plus, per slot, its mask column (-1 = empty) and an optional logit bias (merged slots)."""

    def __init__(self, cfg: KVConfig, layer_idx: int, n_layers: int) -> None:
        super().__init__()
        self.cfg, self.layer_idx, self.n_layers = cfg, layer_idx, n_layers
        self.position: torch.Tensor | None = None  # (B, Hkv, L) long
        self.log_size: torch.Tensor | None = None  # (B, Hkv, L) float, merged slots only
        self.seen = 0               # tokens ever appended
        self.pressed = False        # the prefill compression ran
        self.identity = True        # slots are exactly tokens 0..seen-1: the model's own mask applies as is
        self.kept_per_head: torch.Tensor | None = None  # (B, Hkv) filled slots right after the press

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        attn_kwargs = kwargs.get("kwargs")
        if isinstance(attn_kwargs, dict):
            attn_kwargs[LAYER_KWARG] = self
        if self.seen and not self.pressed:
            raise ValueError("this compressed KV cache was used without its attention function; run the model "
                             "inside `with sparsecraft.attention.compress(model, ...) as press:` and pass "
                             "cache=press.cache()")
        keys, values = super().update(key_states, value_states)
        B, H, q, _ = key_states.shape
        new = torch.arange(self.seen, self.seen + q, device=keys.device).expand(B, H, q)
        self.position = new if self.position is None else torch.cat([self.position, new], dim=-1)
        if self.log_size is not None:
            self.log_size = torch.cat([self.log_size, self.log_size.new_zeros(B, H, q)], dim=-1)
        self.seen += q
        return keys, values

    def press_(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> None:
        """Compress the prompt in place (once, after the prefill attention ran on the full cache)."""
        self.pressed = True
        count = layer_count(self.cfg, self.keys.shape[2], self.layer_idx, self.n_layers)
        kept = press(self.cfg, query, self.keys, self.values, mask, scaling, count)
        if kept is None:
            return
        self.keys, self.values, self.log_size = kept.keys, kept.values, kept.log_size
        # kept.position indexes the current keys; map it to mask columns through the current slot positions
        self.position = torch.where(kept.position >= 0, self.position.gather(-1, kept.position.clamp_min(0)), -1)
        self.identity = False
        self.kept_per_head = (kept.position >= 0).sum(-1)

    def slot_mask(self, mask: torch.Tensor | None, q: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
        """The model's mask (B|1, 1, q, seen) gathered at the kept slots -> additive float (B, Hq, q, L)."""
        pos = self.position  # (B, Hkv, L)
        B, H, L = pos.shape
        filled = (pos >= 0)[:, :, None, :]
        if mask is None:  # only for one query with no padding: every filled slot is visible
            allowed = filled.expand(B, H, q, L)
        else:
            m = mask if mask.dtype == torch.bool else mask == 0
            m = m[..., -self.seen:].expand(B, H, q, self.seen)
            allowed = m.gather(-1, pos.clamp_min(0)[:, :, None, :].expand(B, H, q, L)) & filled
        bias = torch.zeros((), dtype=dtype, device=pos.device) if self.log_size is None else \
            self.log_size.to(dtype)[:, :, None, :]
        out = torch.where(allowed, bias, torch.finfo(dtype).min)
        return out.repeat_interleave(groups, dim=1) if groups > 1 else out

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a compressed KV cache cannot be cropped (assisted / speculative decoding); "
                         "generate without an assistant model")

    def reset(self) -> None:
        super().reset()
        self.position = self.log_size = self.kept_per_head = None
        self.seen, self.pressed, self.identity = 0, False, True

    def _rows(self, fn) -> None:
        for name in ("position", "log_size", "kept_per_head"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices])


class CompressedCache(Cache):
    """One KVLayer per decoder layer. Build it with ``press.cache()`` inside ``sparsecraft.attention.compress``."""

    def __init__(self, cfg: KVConfig, n_layers: int) -> None:
        super().__init__(layers=[KVLayer(cfg, i, n_layers) for i in range(n_layers)])
        self.cfg = cfg

    def nbytes(self) -> int:
        """Bytes held by keys and values now (empty slots included: they are allocated)."""
        return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                   for l in self.layers if l.keys is not None)

    def kept(self) -> list[torch.Tensor]:
        """Per layer, filled slots per (batch row, head) right after the prompt's compression, (B, Hkv)."""
        return [l.kept_per_head for l in self.layers]
