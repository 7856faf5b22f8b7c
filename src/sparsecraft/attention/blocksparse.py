"""Block-sparse causal attention for long prefill, training-free (MInference, arxiv.org/abs/2407.02490; the
gating of SeerAttention, arxiv.org/abs/2410.13276, computed from pooled queries and keys instead of learned).

Per head and query block, score every earlier key block with mean-pooled q and k, keep the first block (attention
sink), the diagonal block and the best others up to ``keep`` blocks, and attend only inside them. The kernel is
plain torch: gather the kept key/value blocks of a group of query blocks, one batched matmul, softmax, matmul.
Shapes: B batch, H query heads, n tokens, D head dim, b block size, nb = ceil(n / b) blocks, K kept blocks per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsecraft.attention.scores import repeat_kv


@dataclass(frozen=True)
class BlockSparseConfig:
    block: int = 64          # tokens per query / key block
    density: float = 0.1     # key blocks kept per query block, as a fraction of all nb blocks (at least 2)
    min_tokens: int = 2048   # shorter prompts run dense attention (selection overhead does not pay there)

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")

    def kept_blocks(self, nb: int) -> int:
        return min(nb, max(2, math.ceil(self.density * nb)))


def _pad(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, n, D) -> (B, H, nb * b, D), zero rows at the end."""
    extra = -x.shape[2] % block
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def block_scores(query: torch.Tensor, keys: torch.Tensor, block: int, scaling: float) -> torch.Tensor:
    """Pooled block attention: (B, H, n, D), (B, H, n, D) -> (B, H, nb, nb) logits, -inf above the diagonal."""
    n = query.shape[2]
    qp = _pad(query, block).unflatten(2, (-1, block)).sum(3)  # (B, H, nb, D)
    counts = torch.full((qp.shape[2],), float(block), device=query.device)
    counts[-1] = n - block * (qp.shape[2] - 1)  # the last block may be short
    qp = qp / counts[:, None]
    kp = _pad(keys, block).unflatten(2, (-1, block)).sum(3) / counts[:, None]
    logits = torch.matmul(qp.float(), kp.float().transpose(-1, -2)) * scaling
    nb = qp.shape[2]
    upper = torch.ones(nb, nb, dtype=torch.bool, device=query.device).triu(1)
    return logits.masked_fill(upper, float("-inf"))


def select_blocks(logits: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, nb, nb) block logits -> (index (B, H, nb, K), valid (B, H, nb, K)): block 0 and the diagonal always,
    then the highest logits; a row with fewer than K causal blocks keeps all of them (the rest marked invalid)."""
    nb = logits.shape[-1]
    K = min(keep, nb)
    diag = torch.eye(nb, dtype=torch.bool, device=logits.device)
    first = torch.zeros(nb, nb, dtype=torch.bool, device=logits.device)
    first[:, 0] = True
    s = logits.masked_fill(diag | first, float("inf"))
    index = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :K]  # ties to the earlier block
    valid = index <= torch.arange(nb, device=logits.device)[:, None]  # causal blocks only
    return index, valid


def block_mask(index: torch.Tensor, valid: torch.Tensor, nb: int) -> torch.Tensor:
    """The kept blocks as a dense (B, H, nb, nb) bool block mask."""
    out = torch.zeros(*index.shape[:-1], nb, dtype=torch.bool, device=index.device)
    return out.scatter_(-1, index, valid)  # invalid entries point at causal-masked blocks anyway: write False


def sparse_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                     block: int, scaling: float, rows: int = 32) -> torch.Tensor:
    """Causal attention restricted to the kept blocks ``index`` (B, H, nb, K) of ``select_blocks`` -> (B, H, n, D).
    Keys/values already have H heads.

    Rows 0..K-2 have at most K causal blocks, all kept: one dense causal attention over the first (K-1) b tokens.
    Every later row keeps exactly K distinct blocks, the diagonal one last once sorted, so a single (b, K b) mask
    (all ones, then a lower triangle) serves every row and the gathered blocks go through torch's fused SDPA
    kernel, ``rows`` query blocks at a time (memory O(rows * K * b * D) per head instead of O(n^2))."""
    B, H, n, D = query.shape
    q, k, v = _pad(query, block), _pad(keys, block), _pad(values, block)
    nb, K = q.shape[2] // block, index.shape[-1]
    out = torch.empty_like(q)
    head = (K - 1) * block  # tokens of the dense rows
    if head:
        out[:, :, :head] = F.scaled_dot_product_attention(q[:, :, :head], k[:, :, :head], v[:, :, :head],
                                                          is_causal=True, scale=scaling)
    if K - 1 >= nb:
        return out[:, :, :n]
    kb, vb = k.unflatten(2, (nb, block)), v.unflatten(2, (nb, block))  # (B, H, nb, b, D)
    tri = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat([torch.ones(block, head, dtype=torch.bool, device=q.device), tri], dim=1)  # (b, K b)
    index = index.sort(dim=-1).values  # ascending: the diagonal block comes last
    for r0 in range(K - 1, nb, rows):
        r1 = min(nb, r0 + rows)
        flat = index[:, :, r0:r1].reshape(B, H, -1)[..., None, None].expand(-1, -1, -1, block, D)
        ks = kb.gather(2, flat).view(B * H, r1 - r0, K * block, D)
        vs = vb.gather(2, flat).view(B * H, r1 - r0, K * block, D)
        qs = q[:, :, r0 * block: r1 * block].reshape(B * H, r1 - r0, block, D)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scaling)  # (B H, r, b, D)
        out[:, :, r0 * block: r1 * block] = o.view(B, H, (r1 - r0) * block, D)
    return out[:, :, :n]


def prefill_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cfg: BlockSparseConfig,
                      scaling: float) -> torch.Tensor:
    """Select blocks and attend: (B, Hq, n, D), (B, Hkv, n, D) x2 -> (B, Hq, n, D)."""
    groups = query.shape[1] // keys.shape[1]
    k, v = repeat_kv(keys, groups), repeat_kv(values, groups)
    logits = block_scores(query, k, cfg.block, scaling)
    index, _ = select_blocks(logits, cfg.kept_blocks(logits.shape[-1]))
    return sparse_attention(query, k, v, index, cfg.block, scaling)
