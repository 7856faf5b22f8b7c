"""Fold an input-channel permutation into a model so that it computes exactly the same function (for N:M masks
that mix strong and weak channels; the permutation itself is solvers/permute.py).

A consumer layer reading hidden units h = act(producers(x)) can have its input columns permuted by ``perm`` if the
producers' output rows (and biases) get the same permutation, because ``act`` is elementwise:
    y = W_c h = W_c[:, perm] h[perm],   h[perm] = act(W_p[perm, :] x + b_p[perm]).
This holds for the MLPs of LLaMA/Mistral/Qwen/Gemma (gate_proj, up_proj -> down_proj), GPT-2 (c_fc -> c_proj),
GPT-NeoX and Phi (fc1 -> fc2): the consumer is a layer of a module named ``*mlp``, its producers the siblings registered BEFORE it whose output width equals that input
width (gate/up before down, as every Hugging Face MLP registers them). Attention
outputs and the residual stream are not permuted (a residual permutation would have to be one for the whole model).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsecraft.engine.blocks import find_blocks, find_targets, is_prunable, set_weight_2d_, weight_2d
from sparsecraft.engine.capture import Calibration, as_batches, move
from sparsecraft.methods.ria import ria_score
from sparsecraft.patterns import NM
from sparsecraft.solvers.permute import channel_permutation
from sparsecraft.stats import InputSqNorm


def mlp_consumers(model: nn.Module) -> dict[str, tuple[nn.Module, list[nn.Module]]]:
    """fqn of every MLP output projection -> (the layer, the layers producing its inputs)."""
    blocks_fqn, blocks = find_blocks(model)
    found: dict[str, tuple[nn.Module, list[nn.Module]]] = {}
    for i, block in enumerate(blocks):
        for fqn, layer in find_targets(block, f"{blocks_fqn}.{i}").items():
            parent_fqn, _, _ = fqn.rpartition(".")
            if not parent_fqn.endswith("mlp"):
                continue
            parent = model.get_submodule(parent_fqn)
            width = weight_2d(layer).shape[1]
            earlier = list(parent.children())
            earlier = earlier[:next(j for j, m in enumerate(earlier) if m is layer)]  # registered before it
            producers = [m for m in earlier if is_prunable(m) and weight_2d(m).shape[0] == width]
            if producers and all(weight_2d(p).shape[1] != width for p in producers):
                found[fqn] = (layer, producers)
    return found


def fold_input_permutation_(consumer: nn.Module, producers: list[nn.Module], perm: torch.Tensor) -> None:
    """Permute ``consumer``'s input columns and every producer's output rows (and bias) by ``perm``, in place."""
    perm = perm.to(consumer.weight.device)
    set_weight_2d_(consumer, weight_2d(consumer).detach()[:, perm].clone())
    for p in producers:
        set_weight_2d_(p, weight_2d(p).detach()[perm, :].clone())
        if getattr(p, "bias", None) is not None:
            with torch.no_grad():
                p.bias.copy_(p.bias[perm].clone())


def input_sqnorms(model: nn.Module, layers: dict[str, nn.Module], calibration: Calibration,
                  batch_size: int = 8) -> dict[str, torch.Tensor]:
    """One forward pass of the whole model: fqn -> (in,) mean of x_j^2 over the calibration tokens."""
    stats = {fqn: InputSqNorm(weight_2d(m).shape[1]) for fqn, m in layers.items()}
    handles = [m.register_forward_hook(lambda _m, inp, _o, f=fqn: stats[f].update(inp[0])) for fqn, m in layers.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in as_batches(calibration, batch_size):
                model(**move(batch, device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {fqn: s.value for fqn, s in stats.items()}


def permute_mlps_for_nm_(model: nn.Module, calibration: Calibration, pattern: NM, a: float = 0.5,
                         rounds: int = 1) -> dict[str, torch.Tensor]:
    """Choose RIA's channel permutation for every MLP output projection from the DENSE model's scores and fold it
    in (the model's function is unchanged). Returns fqn -> perm. Run it before pruning with any N:M method."""
    if not isinstance(pattern, NM):
        raise ValueError(f"channel permutation is for N:M patterns such as '2:4', got {pattern}")
    consumers = mlp_consumers(model)
    norms = input_sqnorms(model, {f: c for f, (c, _) in consumers.items()}, calibration)
    perms: dict[str, torch.Tensor] = {}
    for fqn, (layer, producers) in consumers.items():
        perm = channel_permutation(ria_score(weight_2d(layer).detach().cpu(), norms[fqn], a), pattern, rounds)
        fold_input_permutation_(layer, producers, perm)
        perms[fqn] = perm
    return perms
