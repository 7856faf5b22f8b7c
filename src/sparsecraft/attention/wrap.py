"""``compress(model, ...)``: KV-cache compression for any ``generate`` / forward call, through transformers' own
extension points, with no change to the model's forward.

Two documented hooks of transformers 5.x do the work:
* ``Cache.update`` receives the attention layer's kwargs (``kwargs=...``); a KVLayer puts itself in them, so
* the attention function registered with ``AttentionInterface`` (selected by ``model.set_attn_implementation``)
  finds its cache layer next to the post-RoPE queries. It runs the model's original kernel (sdpa or eager) and:
  - on the prompt: attends over the full prompt (exact), then compresses the layer from those queries;
  - afterwards: gathers the model's attention mask at the kept slots (plus the merge bias), per head.
No eager attention is forced: the scores a press needs are computed from the queries and keys it is handed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from sparsecraft.attention.blocksparse import BlockSparseConfig, prefill_attention
from sparsecraft.attention.cache import LAYER_KWARG, CompressedCache, KVLayer
from sparsecraft.attention.presses import KVConfig

INNER = ("sdpa", "eager")  # kernels we wrap; the mask functions of the same names build the model's mask


def _inner_fn(inner: str):
    if inner == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[inner]


def make_attention(inner: str):
    """The attention function wrapping ``inner`` ("sdpa" or "eager")."""
    kernel = _inner_fn(inner)

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        layer: KVLayer | None = kwargs.pop(LAYER_KWARG, None)
        if layer is None or layer.keys is not key:  # not our cache (or no cache): plain attention
            return kernel(module, query, key, value, attention_mask, **kwargs)
        if not layer.pressed:
            out = kernel(module, query, key, value, attention_mask, **kwargs)  # the prompt sees all of itself
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            layer.press_(query, attention_mask, scaling)
            return out
        if layer.identity:
            return kernel(module, query, key, value, attention_mask, **kwargs)
        mask = layer.slot_mask(attention_mask, query.shape[2], query.shape[1] // key.shape[1], query.dtype)
        return kernel(module, query, key, value, mask, **kwargs)

    return attention


def attention_name(inner: str) -> str:
    """Register (once) and return the attention-implementation name that wraps ``inner``."""
    name = f"sparsecraft_kv_{inner}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, make_attention(inner))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


@dataclass(frozen=True)
class KVPress:
    """A compression setting bound to a model's layer count; ``cache()`` makes a fresh cache per generate call."""
    config: KVConfig
    n_layers: int

    def cache(self) -> CompressedCache:
        return CompressedCache(self.config, self.n_layers)


def _n_layers(model: nn.Module) -> int:
    cfg = model.config.get_text_config(decoder=True)
    n = getattr(cfg, "num_hidden_layers", None)
    if not n:
        raise ValueError(f"cannot find num_hidden_layers in {type(cfg).__name__}; KV compression supports "
                         f"decoder-only transformers models")
    return int(n)


@contextmanager
def compress(model: nn.Module, method: str = "snapkv", budget: float = 0.25, **options: Any) -> Iterator[KVPress]:
    """Inside the block, ``model.generate(..., cache=press.cache())`` (or a forward with that cache)
    compresses every prompt to ``budget`` with ``method``. The model's attention implementation is restored on exit.

        with sparsecraft.attention.compress(model, method="snapkv", budget=0.25) as press:
            out = model.generate(**inputs, cache=press.cache(), max_new_tokens=64)
    """
    kv = KVPress(KVConfig(method=method, budget=budget, **options), _n_layers(model))
    before = model.config._attn_implementation
    inner = before if before in INNER else None
    if inner is None:
        raise ValueError(f"KV compression wraps the 'sdpa' or 'eager' attention, the model uses {before!r}; load it "
                         f"with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))")
    model.set_attn_implementation(attention_name(inner))
    try:
        yield kv
    finally:
        model.set_attn_implementation(before)


def make_block_attention(cfg: BlockSparseConfig):
    """sdpa, except a long unpadded causal prefill (no mask, as many queries as keys, >= cfg.min_tokens), which runs
    block-sparse; decoding and short or padded inputs stay dense."""
    kernel = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        kwargs.pop(LAYER_KWARG, None)
        n = query.shape[2]
        if attention_mask is not None or n != key.shape[2] or n < cfg.min_tokens:
            return kernel(module, query, key, value, attention_mask, **kwargs)
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        out = prefill_attention(query, key, value, cfg, scaling)  # (B, Hq, n, D)
        return out.transpose(1, 2).contiguous(), None

    return attention


@contextmanager
def block_sparse(model: nn.Module, block: int = 64, density: float = 0.1, min_tokens: int = 2048) -> Iterator[
        BlockSparseConfig]:
    """Inside the block, long prefills of ``model`` (sdpa models) attend block-sparsely; restored on exit."""
    cfg = BlockSparseConfig(block, density, min_tokens)
    before = model.config._attn_implementation
    if before != "sdpa":
        raise ValueError(f"block-sparse prefill wraps 'sdpa' attention, the model uses {before!r}; call "
                         f"model.set_attn_implementation('sdpa') first")
    name = f"sparsecraft_blocksparse_{cfg.block}_{cfg.density}_{cfg.min_tokens}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, make_block_attention(cfg))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(name)
    try:
        yield cfg
    finally:
        model.set_attn_implementation(before)
