"""``sparsecraft.prune``: the one call that prunes any model made of repeated blocks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from sparsecraft.engine.blocks import find_blocks, find_targets, weight_2d
from sparsecraft.engine.capture import capture_block_inputs, outside_blocks_on
from sparsecraft.engine.loop import prune_layer, run_oneshot
from sparsecraft.engine.hooks import LayerCollector
from sparsecraft.engine.record import PruneResult
from sparsecraft.methods import Method, get_method
from sparsecraft.methods.base import supports
from sparsecraft.patterns import NM, Pattern, check_shape, check_sparsity, parse_pattern, resolve_sparsity

Calibration = torch.Tensor | Iterable[torch.Tensor] | Iterable[Mapping[str, torch.Tensor]]


def as_batches(calibration: Calibration, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Token ids (N, T), or a list of (T,)/(B, T) tensors, or a list of model-input dicts -> list of dicts."""
    if isinstance(calibration, torch.Tensor):
        if calibration.ndim != 2 or calibration.shape[0] == 0:
            raise ValueError(f"calibration token ids must have shape (nsamples, seqlen) with nsamples >= 1, "
                             f"got {tuple(calibration.shape)}")
        return [{"input_ids": chunk} for chunk in calibration.split(batch_size)]
    batches = []
    for item in calibration:
        if isinstance(item, torch.Tensor):
            batches.append({"input_ids": item if item.ndim == 2 else item.unsqueeze(0)})
        elif isinstance(item, Mapping) and "input_ids" in item:
            batches.append(dict(item))
        else:
            raise ValueError("each calibration item must be a tensor of token ids or a dict with 'input_ids'")
    if not batches:
        raise ValueError("the calibration set is empty; pass at least one batch of token ids")
    return batches


def make_plan(targets: dict[str, nn.Module], sparsity: float, pattern: Pattern,
              plan: Mapping[str, float] | None) -> dict[str, float]:
    """Per-layer sparsity keyed by fqn: ``plan`` entries override the uniform default; 0 means "leave dense"."""
    plan = dict(plan or {})
    unknown = sorted(set(plan) - set(targets))
    if unknown:
        example = ", ".join(list(targets)[:3])
        raise ValueError(f"plan names layers that are not prunable targets: {unknown[:5]}; "
                         f"use full module names such as {example}")
    out = {}
    for fqn in targets:
        s = check_sparsity(plan.get(fqn, sparsity))
        out[fqn] = resolve_sparsity(s, pattern) if s > 0 else 0.0
    return {fqn: s for fqn, s in out.items() if s > 0}


def _check_weights(targets: dict[str, nn.Module], pattern: Pattern) -> None:
    for fqn, module in targets.items():
        w = weight_2d(module)
        check_shape(tuple(w.shape), pattern, fqn)
        if not torch.isfinite(w).all():
            raise ValueError(f"weight of {fqn} contains NaN or inf; fix or reload the model before pruning")


def prune(
    model: nn.Module,
    method: str | Method = "wanda",
    sparsity: float | None = 0.5,
    pattern: str | Pattern = "unstructured",
    calibration: Calibration | None = None,
    *,
    plan: Mapping[str, float] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    method_options: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    offload: torch.device | str = "cpu",
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    resume: Any = None,
) -> PruneResult:
    """Prune every Linear (and GPT-2 Conv1D) inside the model's repeated blocks, in place.

    ``sparsity`` is the uniform default (ignored for N:M, which fixes it); ``plan`` maps fqn -> sparsity.
    ``include`` / ``exclude`` are fnmatch patterns on fqns (e.g. ``["*.mlp.*"]``). Embeddings and the LM head
    are never pruned. Returns a PruneResult with explicit keep-masks and per-layer realized sparsity, relative
    reconstruction error and time. Blocks move to ``device`` one at a time; cached block inputs live on
    ``offload`` (CPU by default, or the device itself when it has room). ``resume`` is an optional
    ``sparsecraft.engine.resume.ResumeState``.
    """
    pattern = parse_pattern(pattern)
    if sparsity is None and plan and not isinstance(pattern, NM):
        sparsity = 0.0  # only the layers named in the plan are pruned
    sparsity = resolve_sparsity(sparsity, pattern)
    method_obj = get_method(method, **(method_options or {}))
    if not supports(method_obj, pattern):
        raise ValueError(f"method {method!r} cannot produce the {pattern} pattern; use unstructured or N:M, or a "
                         f"method that supports blocks (magnitude, random, wanda)")
    blocks_fqn, blocks = find_blocks(model)
    per_block = [find_targets(b, f"{blocks_fqn}.{i}", include, exclude) for i, b in enumerate(blocks)]
    all_targets = {fqn: m for t in per_block for fqn, m in t.items()}
    if not all_targets:
        raise ValueError(f"no prunable layers matched in {blocks_fqn}; loosen include/exclude patterns")
    layer_plan = make_plan(all_targets, sparsity, pattern, plan)
    per_block = [{f: m for f, m in t.items() if f in layer_plan} for t in per_block]
    _check_weights({f: all_targets[f] for f in layer_plan}, pattern)
    name = method if isinstance(method, str) else type(method).__name__.lower()
    result = PruneResult(method=name, pattern=str(pattern), blocks=blocks_fqn)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if calibration is None:
        if method_obj.needs:
            raise ValueError(f"method {name!r} needs calibration data; pass calibration=token ids (nsamples, seqlen)")
        return _prune_data_free(per_block, layer_plan, method_obj, pattern, seed, result)
    batches = as_batches(calibration, batch_size)
    with outside_blocks_on(model, blocks_fqn, device):
        calls = capture_block_inputs(model, blocks[0], batches, device, offload)
    start = 0
    if resume is not None:
        start = resume.bind(model).restore(model, calls, result)
    return run_oneshot(blocks, blocks_fqn, per_block, layer_plan, calls, method_obj, pattern, result, seed=seed,
                       device=device, start=start, progress=progress,
                       on_block_done=resume.save if resume is not None else None)


def _prune_data_free(per_block: list[dict[str, nn.Module]], plan: dict[str, float], method: Method,
                     pattern: Pattern, seed: int, result: PruneResult) -> PruneResult:
    """Magnitude / random without calibration data: no reconstruction error is measured (reported as NaN)."""
    for targets in per_block:
        for fqn, module in targets.items():
            collector = LayerCollector(module, fqn, (), "cpu", hessian=False)  # no inputs, no Hessian
            keep, record = prune_layer(fqn, module, collector, method, plan[fqn], pattern, seed)
            result.masks[fqn], result.layers[fqn] = keep, record
    return result
