"""The public calls: ``sparsecraft.prune`` (one-shot pruning of any model made of repeated blocks) and
``sparsecraft.allocate`` (a per-layer sparsity for it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparsecraft.allocation import check_allocation, erk, outlier_ratios, owl, require_varying, uniform
from sparsecraft.engine.blocks import layers_by_block, weight_2d
from sparsecraft.engine.capture import Calibration, as_batches
from sparsecraft.engine.driver import capture
from sparsecraft.engine.hooks import LayerCollector
from sparsecraft.engine.loop import AfterPrune, prune_layer, run_oneshot
from sparsecraft.engine.passes import input_sqnorms
from sparsecraft.engine.plan import PrunePlan, plan_prune, resolve_layer_sparsity  # noqa: F401 (public here)
from sparsecraft.engine.record import PruneResult
from sparsecraft.engine.resume import ResumeState
from sparsecraft.methods import Method
from sparsecraft.moe.prune import moe_aware
from sparsecraft.patterns import NM, Pattern, check_sparsity, parse_pattern
from sparsecraft.search import search_layer_sparsity


@moe_aware  # MoE models: per-expert Linear views of fused experts, routers kept dense (sparsecraft.moe)
def prune(
    model: nn.Module,
    method: str | Method = "wanda",
    sparsity: float | None = 0.5,
    pattern: str | Pattern = "unstructured",
    calibration: Calibration | None = None,
    *,
    layer_sparsity: Mapping[str, float] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    method_options: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    offload: torch.device | str = "auto",
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    resume: ResumeState | None = None,
    after_prune: AfterPrune | None = None,
) -> PruneResult:
    """Prune every Linear (and GPT-2 Conv1D) inside the model's repeated blocks, in place.

    ``sparsity`` is the uniform default (ignored for N:M, which fixes it); ``layer_sparsity`` maps fqn -> sparsity
    (e.g. from ``sparsecraft.allocate``). ``include`` / ``exclude`` are fnmatch patterns on fqns (e.g.
    ``["*.mlp.*"]``). Embeddings and the LM head are never pruned. Returns a PruneResult with explicit keep-masks and
    per-layer realized sparsity, relative reconstruction error and time. Blocks move to ``device`` one at a time;
    cached block inputs live on ``offload`` (``"auto"``: on a GPU ``device`` when they fit in its free memory, else
    on the CPU; or a device). ``resume`` continues an interrupted run; ``after_prune`` runs on each block after its
    layers are pruned (e.g. block reconstruction).
    """
    plan = plan_prune(model, method, sparsity, pattern, layer_sparsity=layer_sparsity, include=include,
                      exclude=exclude, method_options=method_options)
    method_obj, pattern, blocks_fqn, blocks, per_block, planned = (plan.method, plan.pattern, plan.blocks_fqn,
                                                                   plan.blocks, plan.per_block, plan.layer_sparsity)
    name = plan.name
    result = PruneResult(method=name, pattern=str(pattern), blocks=blocks_fqn)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if calibration is None:
        if method_obj.needs:
            raise ValueError(f"method {name!r} needs calibration data; pass calibration=token ids (nsamples, seqlen)")
        return _prune_data_free(per_block, planned, method_obj, pattern, seed, result)
    _, _, calls = capture(model, as_batches(calibration, batch_size), device, offload)
    start = resume.bind(model).restore(model, calls, result) if resume is not None else 0
    return run_oneshot(blocks, blocks_fqn, per_block, planned, calls, method_obj, pattern, result, seed=seed,
                       device=device, start=start, progress=progress, after_prune=after_prune,
                       on_block_done=resume.save if resume is not None else None)


def _prune_data_free(per_block: list[dict[str, nn.Module]], layer_sparsity: dict[str, float], method: Method,
                     pattern: Pattern, seed: int, result: PruneResult) -> PruneResult:
    """Magnitude / random without calibration data: no reconstruction error is measured (reported as NaN)."""
    for targets in per_block:
        for fqn, module in targets.items():
            collector = LayerCollector(module, fqn, (), "cpu")  # no inputs: no statistics
            keep, record = prune_layer(fqn, module, collector, method, layer_sparsity[fqn], pattern, seed)
            result.masks[fqn], result.layers[fqn] = keep, record
    return result


def allocate(model: nn.Module, kind: str, sparsity: float | None, pattern: str | Pattern = "unstructured",
             calibration: Calibration | None = None, *, include: list[str] | None = None,
             exclude: list[str] | None = None, min_sparsity: float = 0.0, max_sparsity: float = 0.99,
             options: Mapping[str, Any] | None = None, seed: int = 0, batch_size: int = 8,
             device: torch.device | str | None = None) -> dict[str, float]:
    """A per-layer sparsity for ``prune(model, ..., layer_sparsity=...)`` reaching ``sparsity`` exactly; the model is
    unchanged. Kinds: the registry ``sparsecraft.allocation.ALLOCATIONS`` (uniform, erk, owl, search).

    Options: erk ``power``; owl ``M`` (default 5) and ``lam`` (default 0.08); search: see
    ``sparsecraft.search.search_layer_sparsity``.
    """
    options = dict(options or {})
    check_allocation(kind, options)
    pattern = parse_pattern(pattern)
    by_block = layers_by_block(model, include, exclude)
    layers = {f: m for targets in by_block.values() for f, m in targets.items()}
    groups = {f: b for b, targets in by_block.items() for f in targets}
    if not layers:
        raise ValueError("no prunable layers matched; loosen include/exclude patterns")
    shapes = {f: tuple(weight_2d(m).shape) for f, m in layers.items()}
    if isinstance(pattern, NM) and kind == "uniform":
        return uniform(shapes, pattern.sparsity, pattern)
    target = check_sparsity(0.5 if sparsity is None else sparsity)
    bounds = {"min_sparsity": min_sparsity, "max_sparsity": max_sparsity}
    if kind == "uniform":
        return uniform(shapes, target, pattern, **bounds)
    if kind == "erk":
        return erk(shapes, target, pattern, power=float(options.get("power", 1.0)), **bounds)
    require_varying(pattern, kind)
    if calibration is None:
        raise ValueError(f"allocation {kind!r} needs calibration data; pass calibration token ids (n, seqlen)")
    sqnorms = input_sqnorms(model, calibration, include, exclude, batch_size, device)
    weights = {f: weight_2d(m).detach() for f, m in layers.items()}
    if kind == "owl":
        ratios = outlier_ratios(weights, sqnorms, float(options.get("M", 5.0)), groups)
        return owl(ratios, shapes, target, pattern, float(options.get("lam", 0.08)), **bounds)
    return search_layer_sparsity(model, layers, groups, sqnorms, calibration, target, pattern, seed=seed,
                                 batch_size=batch_size, **bounds, **options)
