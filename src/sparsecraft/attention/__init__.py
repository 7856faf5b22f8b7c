"""Sparse attention and KV-cache compression: presses for ``generate`` and block-sparse prefill.

    from sparsecraft.attention import compress
    with compress(model, method="snapkv", budget=0.25) as press:
        model.generate(**inputs, past_key_values=press.cache())
"""

from sparsecraft.attention.cache import CompressedCache, KVLayer
from sparsecraft.attention.presses import PRESSES, KVConfig
from sparsecraft.attention.wrap import KVPress, compress

__all__ = ["PRESSES", "CompressedCache", "KVConfig", "KVLayer", "KVPress", "compress"]
