"""Decode-speed activation sparsity: ``ThresholdedLinear`` keeps its weight TRANSPOSED so the AVX2 kernel
(kernels/colsparse.py) reads only the columns whose input survives the threshold (one token per call).

The hook path of activation/thresholds.py changes the numbers but not the speed (the dense product still reads every
column); this module swap changes the speed and gives the same numbers up to fp32 summation order. Several tokens at
once (prefill) run the masked dense product. ``restore_linears_`` swaps the original layout back, bit-exactly.

A pruned layer (``keep`` mask given) is held as the bitmask layout of W.T instead, so weight and activation
sparsity compound: a skipped input skips its column, a kept input reads only the column's kept weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from sparsecraft.kernels import expand_dense
from sparsecraft.kernels.colsparse import (
    colsparse_bitmask_linear,
    colsparse_linear,
    colsparse_linear_ref,
    transpose_weight,
    transposed_bitmask,
)
from sparsecraft.kernels.layout import BitmaskLayout
from sparsecraft.modules.swap import swap_module_


class Threshold(Protocol):
    """One layer's rule (activation.thresholds.ThresholdSpec satisfies it): inputs with |x| * scale <= threshold
    are skipped."""

    threshold: float
    scale: torch.Tensor  # (in,) float32


class ThresholdedLinear(nn.Module):
    """y = W (x where |x| * scale > threshold) + b. Buffers: threshold, scale, bias, and the weight: wt (in, out)
    dense, or for a pruned layer (``keep`` given) the bitmask layout of W.T: mask_t, values_t, row_ptr_t."""

    def __init__(self, linear: nn.Linear, spec: Threshold, keep: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.pruned = keep is not None
        self._layout_t: BitmaskLayout | None = None
        if keep is None:
            self.register_buffer("wt", transpose_weight(linear.weight))  # (in, out)
        else:
            if keep.shape != linear.weight.shape or keep.dtype != torch.bool:
                raise ValueError(f"keep must be a torch.bool mask shaped like the weight {tuple(linear.weight.shape)}, "
                                 f"got {keep.dtype} {tuple(keep.shape)}")
            layout = transposed_bitmask(linear.weight.detach().cpu(), keep.cpu())
            self.register_buffer("mask_t", layout.mask)
            self.register_buffer("values_t", layout.values)
            self.register_buffer("row_ptr_t", layout.row_ptr)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("threshold", torch.tensor(float(spec.threshold), dtype=torch.float32))
        self.register_buffer("scale", spec.scale.detach().float().clone())
        self.use_kernel = True

    def layout_t(self) -> BitmaskLayout:
        # A view of the buffers, rebuilt only when .to() / load_state_dict replaced them (decode calls this per token).
        values = self.values_t
        if self._layout_t is None or self._layout_t.values is not values:
            self._layout_t = BitmaskLayout(self.mask_t, values, self.row_ptr_t, self.out_features, False)
        return self._layout_t

    def weight_t(self) -> torch.Tensor:
        """The exact weight, transposed (in, out); zeros where pruned."""
        return expand_dense(self.layout_t()) if self.pruned else self.wt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = float(self.threshold)
        one_token = x.numel() == self.in_features  # the column-skipping kernels are batch-1 decode kernels
        if self.pruned and one_token:
            return colsparse_bitmask_linear(self.layout_t(), x, self.scale, t, self.bias, self.use_kernel)
        if one_token:
            return colsparse_linear(self.wt, x, self.scale, t, self.bias, self.use_kernel)
        return colsparse_linear_ref(self.weight_t(), x, self.scale, t, self.bias)

    def to_linear(self) -> nn.Linear:
        weight_t = self.weight_t()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=weight_t.device, dtype=weight_t.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight_t.t())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def swap_linears_(model: nn.Module, specs: dict[str, Threshold],
                  masks: dict[str, torch.Tensor] | None = None) -> dict[str, ThresholdedLinear]:
    """Replace each nn.Linear named in ``specs`` by a ThresholdedLinear, in place; returns the new modules. Layers
    with a keep-mask in ``masks`` (fqn -> bool (out, in), e.g. PruneResult.masks) are packed as pruned."""
    masks = masks or {}
    swapped = {}
    for fqn, spec in specs.items():
        linear = model.get_submodule(fqn)
        if type(linear) is not nn.Linear:
            raise ValueError(f"{fqn} is a {type(linear).__name__}, not an nn.Linear; the decode kernel swaps only "
                             f"nn.Linear layers (use attach() for thresholds on other layer types)")
        swapped[fqn] = ThresholdedLinear(linear, spec, masks.get(fqn))
        swap_module_(model, fqn, swapped[fqn])
    return swapped


def restore_linears_(model: nn.Module) -> None:
    """Undo ``swap_linears_``: every ThresholdedLinear goes back to an nn.Linear with the exact same weight."""
    for fqn, module in list(model.named_modules()):
        if isinstance(module, ThresholdedLinear):
            swap_module_(model, fqn, module.to_linear())
