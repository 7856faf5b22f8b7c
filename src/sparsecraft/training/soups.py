"""Sparse model soups: average models fine-tuned from one sparse model; the shared mask survives.

Averaging models that share a mask keeps the sparsity (the average of zeros is zero); models with different
masks would densify the soup, so they are refused. ("Sparse Model Soups", Zimmer et al. 2024,
https://arxiv.org/abs/2306.16788.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sparsecraft.training.masks import KEEP_BUFFER


def sparse_soup(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    masks: Mapping[str, torch.Tensor] | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted average of ``state_dicts`` (uniform by default) with the shared masks applied exactly.

    Masks come from the ``<fqn>.weight_keep`` entries (saved with a :class:`MaskState` attached) or from
    ``masks`` ({fqn: keep}). Floating tensors are averaged in float64; other tensors must be equal in every model.
    """
    if len(state_dicts) < 2:
        raise ValueError(f"a soup needs at least 2 models, got {len(state_dicts)}")
    weights = [1.0 / len(state_dicts)] * len(state_dicts) if weights is None else list(weights)
    if len(weights) != len(state_dicts) or abs(sum(weights) - 1.0) > 1e-6 or min(weights) < 0:
        raise ValueError(f"weights must be {len(state_dicts)} non-negative numbers summing to 1, got {weights}")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != set(keys):
            raise ValueError(f"model {i} has different keys from model 0: {sorted(set(sd) ^ set(keys))[:5]}")
    soup: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [sd[key] for sd in state_dicts]
        if tensors[0].is_floating_point():
            acc = sum(w * t.double() for w, t in zip(weights, tensors))
            soup[key] = acc.to(tensors[0].dtype)  # type: ignore[union-attr]
        else:
            if not all(torch.equal(tensors[0], t) for t in tensors[1:]):
                what = "mask" if key.endswith(KEEP_BUFFER) else "non-float tensor"
                raise ValueError(
                    f"{what} {key!r} differs between models: a sparse soup needs models fine-tuned from ONE sparse "
                    f"model with fixed masks (do not re-prune or use dynamic sparsity between ingredients)"
                )
            soup[key] = tensors[0].clone()
    for fqn, keep in (masks or {}).items():  # masks given from outside: every ingredient must respect them
        for i, sd in enumerate(state_dicts):
            if torch.count_nonzero(sd[f"{fqn}.weight"][~keep.bool()]):
                raise ValueError(f"model {i} has nonzero weights outside the given mask of {fqn!r}: not the same mask")
    shared = dict(masks or {})
    suffix = "." + KEEP_BUFFER
    shared.update({k[: -len(suffix)]: v for k, v in soup.items() if k.endswith(suffix)})
    if not shared:
        raise ValueError("no masks: attach a MaskState before saving the ingredients, or pass masks={fqn: keep}")
    for fqn, keep in shared.items():
        weight = soup.get(f"{fqn}.weight")
        if weight is None:
            raise ValueError(f"mask for {fqn!r} but no '{fqn}.weight' in the state dicts")
        soup[f"{fqn}.weight"] = weight.masked_fill(~keep.bool(), 0.0)
    return soup
