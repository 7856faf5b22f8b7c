"""The one-shot loop: calibrate -> prune -> propagate the PRUNED outputs, block after block (on engine.driver).

Only the current block and its activations live on the compute device; cached activations stay on ``offload``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import torch
from torch import nn

from sparsecraft.engine.blocks import to_module_layout, weight_2d
from sparsecraft.engine.capture import BlockCall
from sparsecraft.engine.driver import run_blocks
from sparsecraft.engine.hooks import LayerCollector, collect_inputs
from sparsecraft.engine.record import LayerRecord, PartialPruneError, PruneResult
from sparsecraft.methods.base import LayerStats, Method
from sparsecraft.patterns import Pattern

BlockDone = Callable[[int, PruneResult, list[BlockCall]], None]
# after_prune(i, block, calls, dense_outputs, masks): e.g. block reconstruction; runs before propagation. A hook with
# a ``target_calls(i, calls)`` method gets the dense block's outputs on those inputs instead of on ``calls``.
AfterPrune = Callable[[int, nn.Module, list[BlockCall], list[torch.Tensor], dict[str, torch.Tensor]], None]


def layer_generator(seed: int, fqn: str) -> torch.Generator:
    """A generator that depends only on the seed and the layer name: same seed, same mask."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63))


def reconstruction_error(w: torch.Tensor, w_new: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: tr(dW H dW^T) / tr(W H W^T). ``H`` (in, in) is the full
    Hessian, or its diagonal (in,) when the method did not need the Hessian (cross terms between inputs dropped)."""
    dW = w.float() - w_new  # (out, in) float32: the difference of two bf16 weights is exact in float32
    if H.dim() == 1:  # sum_ij dW_ij^2 h_j = ||dW * sqrt(h)||^2: a product and a norm, no squared copies
        sqrt_h = H.float().sqrt()
        num = torch.linalg.vector_norm(dW * sqrt_h).square()
        den = torch.linalg.vector_norm(w * sqrt_h).square()  # promotes a bf16 w to float32 in the product
    else:
        H = H.float()
        num = ((dW @ H) * dW).sum()
        wf = w.float()
        den = ((wf @ H) * wf).sum()
    return float(num / den) if den > 0 else 0.0


def layer_stats(collector: LayerCollector, method: Method, fqn: str) -> LayerStats:
    stats = LayerStats(
        sqnorm=collector.sqnorm.value if collector.sqnorm.count > 0 else None,
        hessian=collector.hessian.value if "hessian" in method.needs else None,
    )
    if not collector.checked:  # once per collector (q/k/v share one), on the statistics, not on every input
        for t in (stats.sqnorm, stats.hessian):
            if t is not None and not torch.isfinite(t).all():
                raise ValueError(f"calibration activations entering {fqn} contain NaN or inf; check the weights of "
                                 f"the earlier layers and the dtype (try --dtype float32)")
        collector.checked = stats.hessian is not None or "hessian" not in method.needs
    return stats


def swap_weight_(module: nn.Module, w_new: torch.Tensor) -> None:
    """Point ``module.weight`` at the (out, in) ``w_new`` (module layout, dtype, device), without copying it into
    the old storage: the old tensor stays intact, so whoever holds it can restore the layer (``run_oneshot``)."""
    new = to_module_layout(module, w_new).to(module.weight.device, module.weight.dtype)
    if new.data_ptr() == module.weight.data_ptr():  # a method that returned its input unchanged
        return
    module.weight.data = new.contiguous()


def prune_layer(fqn: str, module: nn.Module, collector: LayerCollector, method: Method, sparsity: float,
                pattern: Pattern, seed: int) -> tuple[torch.Tensor, LayerRecord]:
    """Prune one layer in place; return its keep-mask (module layout) and record."""
    t0 = time.perf_counter()
    w = weight_2d(module).detach()  # (out, in)
    stats = layer_stats(collector, method, fqn)
    w_new, keep = method.prune(w, stats, sparsity, pattern, layer_generator(seed, fqn))
    if collector.hessian is not None:
        error = reconstruction_error(w, w_new, collector.hessian.value)
    elif collector.sqnorm.count > 0:
        error = reconstruction_error(w, w_new, collector.sqnorm.value)
    else:
        error = float("nan")
    swap_weight_(module, w_new)
    zeros = keep.numel() - int(keep.count_nonzero())
    record = LayerRecord(fqn, tuple(w.shape), sparsity, zeros / keep.numel(), error, time.perf_counter() - t0)
    return to_module_layout(module, keep.cpu()), record


def prune_block(block: nn.Module, targets: dict[str, nn.Module], layer_sparsity: dict[str, float],
                calls: list[BlockCall], method: Method, pattern: Pattern, seed: int, device: torch.device | str,
                result: PruneResult, after_prune: AfterPrune | None = None, index: int = 0) -> None:
    """Calibrate every target of one block on all batches, then prune each with its planned sparsity."""
    dense_outputs: list[torch.Tensor] = []
    # a hook may ask for the dense block's outputs on other inputs (block reconstruction toward the dense model)
    target_calls = getattr(after_prune, "target_calls", None)
    inputs = target_calls(index, calls) if target_calls is not None else calls
    with torch.no_grad(), collect_inputs(targets, method.needs, device) as collectors:
        for call in calls:
            out = call.run(block, device)
            if after_prune is not None and inputs is calls:
                dense_outputs.append(out.to(call.hidden.device))
    if inputs is not calls:
        with torch.no_grad():  # the block is still dense here, and no collector is listening
            dense_outputs = [c.run(block, device).to(c.hidden.device) for c in inputs]
    for fqn, module in targets.items():
        keep, record = prune_layer(fqn, module, collectors[fqn], method, layer_sparsity[fqn], pattern, seed)
        result.masks[fqn] = keep
        result.layers[fqn] = record
    if after_prune is not None:
        after_prune(index, block, calls, dense_outputs, {f: result.masks[f] for f in targets})


def run_oneshot(blocks: nn.ModuleList, blocks_fqn: str, block_targets: list[dict[str, nn.Module]],
                layer_sparsity: dict[str, float], calls: list[BlockCall], method: Method, pattern: Pattern,
                result: PruneResult, *, seed: int = 0, device: torch.device | str = "cpu", start: int = 0,
                on_block_done: BlockDone | None = None, after_prune: AfterPrune | None = None,
                progress: bool = True) -> PruneResult:
    """Prune blocks ``start..`` in order; ``calls`` hold the inputs of block ``start``."""
    current = {"i": start, "saved": {}, "t0": 0.0}

    def step(i: int, block: nn.Module, block_calls: list[BlockCall]) -> None:
        targets = block_targets[i]
        # the original weights by reference: prune_layer swaps new tensors in and leaves these untouched
        current.update(i=i, t0=time.perf_counter(), saved={fqn: m.weight.data for fqn, m in targets.items()})
        prune_block(block, targets, layer_sparsity, block_calls, method, pattern, seed, device, result,
                    after_prune, i)

    def done(i: int) -> None:
        result.seconds += time.perf_counter() - current["t0"]
        if on_block_done is not None:
            on_block_done(i, result, calls)

    try:
        run_blocks(blocks, calls, step, device, start=start, desc="pruning blocks", progress=progress, after=done)
    except Exception as e:
        i = current["i"]
        for fqn, m in block_targets[i].items():  # the failing block goes back to its original weights
            if fqn in current["saved"]:
                m.weight.data = current["saved"][fqn].to(m.weight.device)
            result.masks.pop(fqn, None)
            result.layers.pop(fqn, None)
        if i == start:
            raise
        raise PartialPruneError(
            f"pruning failed at block {i} ({blocks_fqn}.{i}): {e}. Blocks 0-{i - 1} ARE pruned (masks in "
            f"the error's .result); block {i} was restored. Reload the model before trying again.",
            result, list(range(i))) from e
    return result
