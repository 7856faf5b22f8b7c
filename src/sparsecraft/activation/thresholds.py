"""Activation thresholds as buffers, calibrated from the measured statistics, attached through forward pre-hooks.

A Linear's input x (..., in) is sparsified before the product as x_j -> x_j * [|x_j| * scale_j > threshold]:
- TEAL (magnitude, https://arxiv.org/abs/2408.14690): scale = 1, threshold = the s-quantile of |x|;
- WINA (weight-informed, https://arxiv.org/abs/2505.19427): scale_j = ||W[:, j]||_2, threshold = the s-quantile of
  |x_j| * ||W[:, j]||_2, so an input is kept when it moves the output a lot, not only when it is large.

Both live in one ``ActivationThreshold`` module per Linear, registered as the Linear's child ``act_threshold``: its
buffers appear in ``model.state_dict()``, follow ``model.to()``, and save/load with safetensors. ``attach`` returns an
``Attachment`` that owns the hooks; ``detach()`` (or leaving its ``with`` block) removes hooks and children, which
restores the exact dense outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsecraft.activation.stats import InputStats
from sparsecraft.engine.blocks import weight_2d

CHILD = "act_threshold"
FORMAT = "sparsecraft-activation-thresholds-v1"


class ActivationThreshold(nn.Module):
    """x -> x where |x| * scale > threshold, else 0. Buffers: threshold () and scale (in,), float32."""

    def __init__(self, scale: torch.Tensor, threshold: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        self.register_buffer("scale", scale.detach().float().clone())

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() * self.scale > self.threshold  # (..., in) bool, True = the input is used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.keep(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


@dataclass(frozen=True)
class ThresholdSpec:
    """One layer's calibrated rule and the sparsity it realizes on the calibration data."""

    threshold: float
    scale: torch.Tensor  # (in,) float32
    sparsity: float
    method: str


def teal_spec(stats: InputStats, sparsity: float) -> ThresholdSpec:
    t = stats.abs.quantile(sparsity)
    return ThresholdSpec(t, torch.ones_like(stats.col_norm), stats.abs.fraction_below(t), "teal")


def wina_spec(stats: InputStats, sparsity: float) -> ThresholdSpec:
    t = stats.wina.quantile(sparsity)
    return ThresholdSpec(t, stats.col_norm.clone(), stats.wina.fraction_below(t), "wina")


THRESHOLD_METHODS: dict[str, Callable[[InputStats, float], ThresholdSpec]] = {"teal": teal_spec, "wina": wina_spec}


def calibrate(stats: dict[str, InputStats], sparsity: float | dict[str, float],
              method: str = "teal") -> dict[str, ThresholdSpec]:
    """Per-layer thresholds reaching ``sparsity`` (one value, or fqn -> value) on the measured data."""
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown activation-sparsity method {method!r}; use one of {', '.join(THRESHOLD_METHODS)}")
    plan = sparsity if isinstance(sparsity, dict) else {fqn: sparsity for fqn in stats}
    for fqn, s in plan.items():
        if fqn not in stats:
            raise ValueError(f"no statistics for layer {fqn!r}; measure the model first (layers: "
                             f"{', '.join(list(stats)[:4])}, ...)")
        if not 0.0 <= s < 1.0:
            raise ValueError(f"activation sparsity for {fqn} must be in [0, 1), got {s}; e.g. 0.5")
    return {fqn: THRESHOLD_METHODS[method](stats[fqn], s) for fqn, s in plan.items()}


class Attachment:
    """Owns the threshold children and hooks attached to a model; ``detach()`` removes all of them.

    With ``record=True`` the hooks also count how many inputs each layer zeroed (``realized()``), at a small cost;
    with ``apply=False`` they only count and pass the input through unchanged (the sparsity the thresholds WOULD
    realize on the dense model).
    """

    def __init__(self, model: nn.Module, record: bool = False, apply: bool = True) -> None:
        self.model = model
        self.apply = apply
        self.layers: dict[str, nn.Module] = {}
        self._handles: list = []
        self.record = record
        self.zeroed: dict[str, int] = {}
        self.seen: dict[str, int] = {}

    def add(self, fqn: str, linear: nn.Module, child: ActivationThreshold) -> None:
        if hasattr(linear, CHILD):
            raise ValueError(f"{fqn} already carries activation thresholds; detach the previous attachment first")
        linear.register_module(CHILD, child)
        self.layers[fqn] = linear
        self._handles.append(linear.register_forward_pre_hook(self._hook(fqn)))

    def _hook(self, fqn: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            gate: ActivationThreshold = getattr(module, CHILD)
            x = args[0]
            if self.record or not self.apply:
                keep = gate.keep(x)
                self.zeroed[fqn] = self.zeroed.get(fqn, 0) + int((~keep).sum())
                self.seen[fqn] = self.seen.get(fqn, 0) + keep.numel()
            if not self.apply:
                return None
            return (gate(x),) + tuple(args[1:])
        return hook

    def realized(self) -> dict[str, float]:
        """Fraction of inputs zeroed per layer since attach (needs ``record=True`` or ``apply=False``)."""
        return {fqn: self.zeroed[fqn] / self.seen[fqn] for fqn in self.seen}

    def detach(self) -> None:
        try:
            for h in self._handles:
                h.remove()
        finally:
            for linear in self.layers.values():
                if hasattr(linear, CHILD):
                    delattr(linear, CHILD)
            self._handles, self.layers = [], {}

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(model: nn.Module, specs: dict[str, ThresholdSpec], record: bool = False,
           apply: bool = True) -> Attachment:
    """Register one ActivationThreshold child + pre-hook per layer in ``specs``; use as a context manager or detach()."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    att = Attachment(model, record, apply)
    try:
        for fqn, spec in specs.items():
            if fqn not in modules:
                raise ValueError(f"the model has no module {fqn!r}; thresholds were calibrated on another model")
            linear = modules[fqn]
            features = weight_2d(linear).shape[1]
            if spec.scale.numel() != features:
                raise ValueError(f"{fqn}: thresholds have {spec.scale.numel()} input features, the layer has "
                                 f"{features}; calibrate on this model")
            att.add(fqn, linear, ActivationThreshold(spec.scale, spec.threshold).to(device))
    except BaseException:
        att.detach()
        raise
    return att


def save_thresholds(att: Attachment, path: str | Path, method: str = "") -> None:
    """Write the attached thresholds (fqn.act_threshold.{threshold,scale}) to a safetensors file."""
    from safetensors.torch import save_file

    tensors = {}
    for fqn, linear in att.layers.items():
        child: ActivationThreshold = getattr(linear, CHILD)
        tensors[f"{fqn}.{CHILD}.threshold"] = child.threshold.detach().cpu().clone()
        tensors[f"{fqn}.{CHILD}.scale"] = child.scale.detach().cpu().clone()
    save_file(tensors, str(path), metadata={"format": FORMAT, "method": method})


def load_specs(path: str | Path) -> dict[str, ThresholdSpec]:
    from safetensors import safe_open

    suffix = f".{CHILD}.threshold"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sparsecraft thresholds file (format {meta.get('format')!r}); "
                             f"write one with `sparsecraft activations calibrate`")
        keys = [k for k in f.keys() if k.endswith(suffix)]
        return {k.removesuffix(suffix): ThresholdSpec(float(f.get_tensor(k)),
                                                      f.get_tensor(k.removesuffix("threshold") + "scale"),
                                                      float("nan"), meta.get("method", ""))
                for k in keys}


def load_thresholds(model: nn.Module, path: str | Path, record: bool = False) -> Attachment:
    """Attach the thresholds saved by ``save_thresholds`` to ``model``."""
    return attach(model, load_specs(path), record)
