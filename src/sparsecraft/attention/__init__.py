"""Sparse attention and KV-cache compression: presses for ``generate`` and block-sparse prefill.

    from sparsecraft.attention import compress
    with compress(model, method="snapkv", budget=0.25) as press:
        model.generate(**inputs, cache=press.cache())
"""

from sparsecraft.attention.cache import CompressedCache, KVLayer
from sparsecraft.attention.presses import PRESSES, KVConfig
from sparsecraft.attention.blocksparse import BlockSparseConfig
from sparsecraft.attention.wrap import KVPress, block_sparse, compress

__all__ = ["PRESSES", "BlockSparseConfig", "block_sparse", "CompressedCache", "KVConfig", "KVLayer", "KVPress", "compress"]
