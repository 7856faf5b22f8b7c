"""Decode-speed path: swap a thresholded Linear for ``ThresholdedLinear``, which keeps its weight TRANSPOSED so the
AVX2 kernel (kernels/colsparse.py) reads only the columns whose input survives the threshold (one token per call).

The hook path of thresholds.py changes the numbers but not the speed (the dense product still reads every column);
this module swap changes the speed and gives the same numbers up to fp32 summation order. Several tokens at once
(prefill) run the masked dense product. ``restore_linears_`` swaps the original layout back, bit-exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsecraft.activation.thresholds import ThresholdSpec
from sparsecraft.kernels.colsparse import colsparse_linear, colsparse_linear_ref, transpose_weight


class ThresholdedLinear(nn.Module):
    """y = W (x where |x| * scale > threshold) + b with W stored as wt (in, out). Buffers: wt, threshold, scale."""

    def __init__(self, linear: nn.Linear, spec: ThresholdSpec) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("wt", transpose_weight(linear.weight))  # (in, out)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("threshold", torch.tensor(float(spec.threshold), dtype=torch.float32))
        self.register_buffer("scale", spec.scale.detach().float().clone())
        self.use_kernel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = float(self.threshold)
        if x.numel() == self.in_features:  # one token: the column-skipping kernel
            return colsparse_linear(self.wt, x, self.scale, t, self.bias, self.use_kernel)
        return colsparse_linear_ref(self.wt, x, self.scale, t, self.bias)

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.wt.device, dtype=self.wt.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.wt.t())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def swap_linears_(model: nn.Module, specs: dict[str, ThresholdSpec]) -> dict[str, ThresholdedLinear]:
    """Replace each nn.Linear named in ``specs`` by a ThresholdedLinear, in place; returns the new modules."""
    swapped = {}
    for fqn, spec in specs.items():
        linear = model.get_submodule(fqn)
        if type(linear) is not nn.Linear:
            raise ValueError(f"{fqn} is a {type(linear).__name__}, not an nn.Linear; the decode kernel swaps only "
                             f"nn.Linear layers (use attach() for thresholds on other layer types)")
        swapped[fqn] = ThresholdedLinear(linear, spec)
        _set(model, fqn, swapped[fqn])
    return swapped


def restore_linears_(model: nn.Module) -> None:
    """Undo ``swap_linears_``: every ThresholdedLinear goes back to an nn.Linear with the exact same weight."""
    for fqn, module in list(model.named_modules()):
        if isinstance(module, ThresholdedLinear):
            _set(model, fqn, module.to_linear())
