"""Physical removal: slice weights so the model becomes a smaller dense model, and say so in its config.

Every function here edits the model in place (trailing underscore) and keeps dtype and device. Linear layers get
new, smaller Parameters (never views of the old ones, so the old storage is freed and ``save_pretrained`` writes
the small tensors). GPT-2's Conv1D stores its weight (in, out); ``_set_2d_`` handles both layouts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsecraft.engine.blocks import find_blocks, weight_2d
from sparsecraft.structured.arch import ArchSpec, head_dim, kv_heads


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _set_2d_(m: nn.Module, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Replace the weight (given (out, in)) and bias of a Linear or Conv1D by new Parameters."""
    out_f, in_f = w.shape
    m.weight = nn.Parameter((w.T if _is_conv1d(m) else w).contiguous().clone(), requires_grad=m.weight.requires_grad)
    if bias is not None:
        m.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=m.weight.requires_grad)
    if _is_conv1d(m):
        m.nf = out_f
    else:
        m.in_features, m.out_features = in_f, out_f


def slice_rows_(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep output rows ``idx`` (and their bias entries)."""
    w = weight_2d(m).detach()
    _set_2d_(m, w[idx], m.bias.detach()[idx] if m.bias is not None else None)


def slice_cols_(m: nn.Module, idx: torch.Tensor, bias_delta: torch.Tensor | None = None) -> None:
    """Keep input columns ``idx``; add ``bias_delta`` (out,) to the bias (FLAP compensation; bias must exist)."""
    w = weight_2d(m).detach()
    bias = m.bias.detach() if m.bias is not None else None
    if bias_delta is not None:
        assert bias is not None, "add_zero_bias_ before compensating"
        bias = bias + bias_delta.to(bias)
    _set_2d_(m, w[:, idx], bias)


def add_zero_bias_(m: nn.Module) -> None:
    if m.bias is None:
        out_f = weight_2d(m).shape[0]
        m.bias = nn.Parameter(torch.zeros(out_f, dtype=m.weight.dtype, device=m.weight.device))


def compensation(W_out: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """FLAP bias compensation (An et al. 2024, eq. 7): the removed input channels carried about their mean, so add
    W[:, removed] @ mean[removed] (out,) to the consumer's bias. W_out (out, in), mean (in,)."""
    return W_out.detach().double()[:, removed] @ mean.double()[removed].to(W_out.device)


def shrink_mlp_(block: nn.Module, spec: ArchSpec, keep: torch.Tensor, mean: torch.Tensor | None = None) -> None:
    """Keep MLP neurons ``keep``; with ``mean`` (the neurons' mean activation) compensate into mlp_out's bias."""
    out = block.get_submodule(spec.mlp_out)
    width = weight_2d(out).shape[1]
    delta = None
    if mean is not None:
        removed = torch.ones(width, dtype=torch.bool)
        removed[keep] = False
        delta = compensation(weight_2d(out), mean, removed.nonzero().flatten())
    for name in spec.mlp_in:
        slice_rows_(block.get_submodule(name), keep)
    slice_cols_(out, keep, delta)


def head_channels(groups: torch.Tensor, group_width: int) -> torch.Tensor:
    """Kept groups (G',) -> the channel indices they span, each group ``group_width`` consecutive channels."""
    return (groups[:, None] * group_width + torch.arange(group_width)[None, :]).flatten()


def shrink_heads_(block: nn.Module, spec: ArchSpec, config: object, keep: torch.Tensor,
                  mean: torch.Tensor | None = None) -> None:
    """Keep KV groups ``keep``: their query heads in q and o, their KV head in k and v."""
    D = head_dim(config)
    r = config.num_attention_heads // kv_heads(config)  # query heads per KV head
    q_idx, kv_idx = head_channels(keep, r * D), head_channels(keep, D)
    o = block.get_submodule(spec.o)
    delta = None
    if mean is not None:
        removed = torch.ones(weight_2d(o).shape[1], dtype=torch.bool)
        removed[q_idx] = False
        delta = compensation(weight_2d(o), mean, removed.nonzero().flatten())
    slice_rows_(block.get_submodule(spec.q), q_idx)
    slice_rows_(block.get_submodule(spec.k), kv_idx)
    slice_rows_(block.get_submodule(spec.v), kv_idx)
    slice_cols_(o, q_idx, delta)


def _slice_norm_(norm: nn.Module, idx: torch.Tensor) -> None:
    norm.weight = nn.Parameter(norm.weight.detach()[idx].clone())
    if getattr(norm, "bias", None) is not None:
        norm.bias = nn.Parameter(norm.bias.detach()[idx].clone())
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (len(idx),)


def shrink_hidden_(model: nn.Module, spec: ArchSpec, keep: torch.Tensor) -> None:
    """Keep residual-stream channels ``keep`` everywhere: embedding, block readers/writers/norms, final norm, head."""
    _, blocks = find_blocks(model)
    embed, head = model.get_submodule(spec.embed), model.get_submodule(spec.lm_head)
    tied = head.weight is embed.weight
    C, k = embed.weight.shape[1], len(keep)
    weight = embed.weight.detach()[:, keep]  # (V, k)
    if spec.embed_scaled:  # Gemma scales by sqrt(hidden_size): keep the embedding outputs unchanged
        a = math.sqrt(C / k)
        weight = weight * a
        embed.embed_scale.fill_(math.sqrt(k))
        embed.scalar_embed_scale = math.sqrt(k)
        if tied:  # the head reads a times larger weights: divide the final norm's effective scale by a
            fn = model.get_submodule(spec.final_norm)
            with torch.no_grad():
                fn.weight.copy_((spec.norm_offset + fn.weight) / a - spec.norm_offset)
    embed.weight = nn.Parameter(weight.clone())
    embed.embedding_dim = k
    for block in blocks:
        for name in spec.readers:
            slice_cols_(block.get_submodule(name), keep)
        for name in spec.writers:
            slice_rows_(block.get_submodule(name), keep)
        for name in spec.norms:
            _slice_norm_(block.get_submodule(name), keep)
    _slice_norm_(model.get_submodule(spec.final_norm), keep)
    if tied:
        head.weight = embed.weight
    else:
        slice_cols_(head, keep)


def drop_blocks_(model: nn.Module, drop: list[int]) -> None:
    """Remove blocks ``drop``; renumber the survivors' ``layer_idx`` (KV-cache slots) and the config's layer list."""
    fqn, blocks = find_blocks(model)
    kept = [b for i, b in enumerate(blocks) if i not in set(drop)]
    if not kept:
        raise ValueError("cannot remove every block; keep at least one")
    parent = model.get_submodule(fqn.rsplit(".", 1)[0]) if "." in fqn else model
    setattr(parent, fqn.rsplit(".", 1)[-1], nn.ModuleList(kept))
    for new, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
    types = getattr(model.config, "layer_types", None)
    if types:
        model.config.layer_types = [t for i, t in enumerate(types) if i not in set(drop)]
    model.config.num_hidden_layers = len(kept)


def rewrite_config_(model: nn.Module, spec: ArchSpec) -> None:
    """Read the new sizes off the modules into the config (explicit ``head_dim``, so it never gets re-derived)."""
    cfg = model.config
    _, blocks = find_blocks(model)
    block = blocks[0]
    setattr(cfg, spec.ffn_key, weight_2d(block.get_submodule(spec.mlp_out)).shape[1])
    cfg.num_hidden_layers = len(blocks)
    if spec.width_ok:
        D = head_dim(cfg)
        r = cfg.num_attention_heads // kv_heads(cfg)
        groups = weight_2d(block.get_submodule(spec.k)).shape[0] // D
        cfg.head_dim = D
        cfg.num_key_value_heads = groups
        cfg.num_attention_heads = groups * r
        cfg.hidden_size = model.get_submodule(spec.embed).weight.shape[1]
