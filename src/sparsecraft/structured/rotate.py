"""SliceGPT-style rotation of the residual stream (Ashkboos et al. 2024, https://arxiv.org/abs/2401.15024), with ONE
orthogonal Q for the whole stream so the architecture stays vanilla (SliceGPT's per-block Q needs extra shortcut
matrices, i.e. custom layers, to load).

1. Fold every RMSNorm's scale into the layers that read it (W <- W diag(g)), leaving unit norms. An RMSNorm with
   unit scale commutes with an orthogonal Q: ||xQ|| = ||x||. (LayerNorm's mean subtraction does not: LLaMA-family
   models only.) A tied head is untied first (the final norm's scale folds into the head, not the embedding).
2. Q = eigenvectors of sum_x x^T x over the residual stream at every block boundary, largest eigenvalue first.
3. Rotate: embedding E <- E Q; readers W <- W Q; writers W <- Q^T W, b <- Q^T b. The model's logits are unchanged.
4. Slicing then keeps the first k channels (``surgery.shrink_hidden_`` with keep = arange(k)) and sets every norm's
   scale to sqrt(C / k): the kept channels carry nearly all of ||x||, but the RMS now divides by k, not C.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsecraft.engine.blocks import find_blocks, set_weight_2d_, weight_2d
from sparsecraft.structured.arch import ArchSpec


def untie_(model: nn.Module, spec: ArchSpec) -> bool:
    """Give the head its own weight copy; -> whether it was tied."""
    embed, head = model.get_submodule(spec.embed), model.get_submodule(spec.lm_head)
    if head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return True


def _fold_(norm: nn.Module, readers: list[nn.Module], offset: float) -> None:
    g = (offset + norm.weight.detach().double())  # (C,) effective scale
    for m in readers:
        set_weight_2d_(m, (weight_2d(m).detach().double() * g[None, :]).to(m.weight.dtype))
    with torch.no_grad():
        norm.weight.fill_(1.0 - offset)


def fold_norms_(model: nn.Module, spec: ArchSpec) -> None:
    """Fold every norm scale into its readers (model outputs unchanged up to rounding)."""
    if not spec.rms_norm or len(spec.norms) != 2:
        raise ValueError(f"rotation needs RMSNorm before attention and before the MLP (LLaMA family: "
                         f"llama, mistral, qwen2, gemma); {model.config.model_type} is not supported. Drop --rotate")
    untie_(model, spec)
    _, blocks = find_blocks(model)
    attn_norm, mlp_norm = spec.norms
    for block in blocks:
        _fold_(block.get_submodule(attn_norm), [block.get_submodule(n) for n in (spec.q, spec.k, spec.v)],
               spec.norm_offset)
        _fold_(block.get_submodule(mlp_norm), [block.get_submodule(n) for n in spec.mlp_in], spec.norm_offset)
    _fold_(model.get_submodule(spec.final_norm), [model.get_submodule(spec.lm_head)], spec.norm_offset)


def principal_basis(cov: torch.Tensor) -> torch.Tensor:
    """(C, C) symmetric x^T x -> orthogonal Q (C, C), columns = eigenvectors by decreasing eigenvalue."""
    values, vectors = torch.linalg.eigh(cov.double())  # ascending
    return vectors.flip(1)


def rotate_(model: nn.Module, spec: ArchSpec, Q: torch.Tensor) -> None:
    """Rotate the residual stream by Q (C, C): x -> x Q everywhere. Norms must be folded first."""
    Q = Q.double()
    embed = model.get_submodule(spec.embed)
    with torch.no_grad():
        embed.weight.copy_((embed.weight.double() @ Q).to(embed.weight.dtype))  # (V, C)
    _, blocks = find_blocks(model)
    readers = [b.get_submodule(n) for b in blocks for n in spec.readers] + [model.get_submodule(spec.lm_head)]
    for m in readers:
        set_weight_2d_(m, (weight_2d(m).detach().double() @ Q).to(m.weight.dtype))  # (out, C) @ (C, C)
    for m in [b.get_submodule(n) for b in blocks for n in spec.writers]:
        set_weight_2d_(m, (Q.T @ weight_2d(m).detach().double()).to(m.weight.dtype))  # (C, C) @ (C, in)
        if m.bias is not None:
            with torch.no_grad():
                m.bias.copy_((Q.T @ m.bias.double()).to(m.bias.dtype))


def rescale_norms_(model: nn.Module, spec: ArchSpec, dense_hidden: int) -> None:
    """After slicing to k channels: every (unit) norm scale becomes sqrt(C / k) (see the module docstring, step 4)."""
    k = model.get_submodule(spec.embed).weight.shape[1]
    scale = math.sqrt(dense_hidden / k)
    _, blocks = find_blocks(model)
    norms = [b.get_submodule(n) for b in blocks for n in spec.norms] + [model.get_submodule(spec.final_norm)]
    with torch.no_grad():
        for n in norms:
            n.weight.fill_(scale - spec.norm_offset)
