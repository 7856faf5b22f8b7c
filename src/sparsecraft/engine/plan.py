"""What a one-shot prune will do, every argument checked against the model before anything runs or is written:
the method, the pattern, the blocks and their targets, and the sparsity of every layer it prunes. The in-memory
prune (``sparsecraft.prune``) and the streamed prune (``engine.stream``) plan with the same code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsecraft.engine.blocks import find_blocks, find_targets, weight_2d
from sparsecraft.methods import Method, get_method
from sparsecraft.methods.base import supports
from sparsecraft.patterns import NM, Pattern, check_shape, check_sparsity, parse_pattern, resolve_sparsity


@dataclass
class PrunePlan:
    """``method`` (the registry entry, options applied), ``name`` (its name), ``sparsity`` (the uniform default),
    ``per_block`` (the targets of each block that get pruned) and ``layer_sparsity`` (fqn -> sparsity, pruned layers
    only)."""

    name: str
    method: Method
    pattern: Pattern
    sparsity: float
    blocks_fqn: str
    blocks: nn.ModuleList
    per_block: list[dict[str, nn.Module]]
    layer_sparsity: dict[str, float]


def resolve_layer_sparsity(targets: dict[str, nn.Module], sparsity: float, pattern: Pattern,
                           layer_sparsity: Mapping[str, float] | None) -> dict[str, float]:
    """Per-layer sparsity keyed by fqn: ``layer_sparsity`` entries override the uniform default; 0 = leave dense."""
    given = dict(layer_sparsity or {})
    unknown = sorted(set(given) - set(targets))
    if unknown:
        example = ", ".join(list(targets)[:3])
        raise ValueError(f"layer_sparsity names layers that are not prunable targets: {unknown[:5]}; "
                         f"use full module names such as {example}")
    out = {}
    for fqn in targets:
        s = check_sparsity(given.get(fqn, sparsity))
        out[fqn] = resolve_sparsity(s, pattern) if s > 0 else 0.0
    return {fqn: s for fqn, s in out.items() if s > 0}


def check_weights(targets: dict[str, nn.Module], pattern: Pattern, values: bool = True) -> None:
    """Every target's weight fits the pattern; with ``values``, it is also materialised and finite."""
    for fqn, module in targets.items():
        w = weight_2d(module)
        if values and w.device.type == "meta":
            raise ValueError(f"weight of {fqn} is on the meta device (an offloaded or empty model); load the "
                             f"weights first, or prune a safetensors folder with streaming")
        check_shape(tuple(w.shape), pattern, fqn)
        if values and not torch.isfinite(w).all():
            raise ValueError(f"weight of {fqn} contains NaN or inf; fix or reload the model before pruning")


def plan_prune(model: nn.Module, method: str | Method = "wanda", sparsity: float | None = 0.5,
               pattern: str | Pattern = "unstructured", *, layer_sparsity: Mapping[str, float] | None = None,
               include: list[str] | None = None, exclude: list[str] | None = None,
               method_options: dict[str, Any] | None = None, calibrated: bool | None = None,
               check_values: bool = True) -> PrunePlan:
    """Check every argument of a prune against the model without changing anything; raises ValueError saying what
    to fix. ``calibrated`` False: refuse methods that need calibration data. ``check_values`` False: a skeleton on
    the meta device is enough (shapes only)."""
    pattern = parse_pattern(pattern)
    if sparsity is None and layer_sparsity and not isinstance(pattern, NM):
        sparsity = 0.0  # only the layers named in layer_sparsity are pruned
    sparsity = resolve_sparsity(sparsity, pattern)
    method_obj = get_method(method, **(method_options or {}))
    name = method if isinstance(method, str) else type(method).__name__.lower()
    if not supports(method_obj, pattern):
        raise ValueError(f"method {name!r} cannot produce the {pattern} pattern; use unstructured or N:M, or a "
                         f"method that supports blocks (magnitude, random, wanda)")
    if calibrated is False and method_obj.needs:
        raise ValueError(f"method {name!r} needs calibration data; pass calibration=token ids (nsamples, seqlen)")
    blocks_fqn, blocks = find_blocks(model)
    per_block = [find_targets(b, f"{blocks_fqn}.{i}", include, exclude) for i, b in enumerate(blocks)]
    all_targets = {fqn: m for t in per_block for fqn, m in t.items()}
    if not all_targets:
        raise ValueError(f"no prunable layers matched in {blocks_fqn}; loosen include/exclude patterns")
    planned = resolve_layer_sparsity(all_targets, sparsity, pattern, layer_sparsity)
    per_block = [{f: m for f, m in t.items() if f in planned} for t in per_block]
    check_weights({f: all_targets[f] for f in planned}, pattern, check_values)
    return PrunePlan(name, method_obj, pattern, sparsity, blocks_fqn, blocks, per_block, planned)
