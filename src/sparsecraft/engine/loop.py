"""The one layer-wise loop: calibrate -> prune -> propagate the PRUNED outputs, block after block.

Only the current block and its activations live on the compute device; cached activations stay on ``offload``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsecraft.engine.blocks import set_weight_2d_, to_module_layout, weight_2d
from sparsecraft.engine.capture import BlockCall
from sparsecraft.engine.hooks import LayerCollector, collect_inputs
from sparsecraft.engine.record import LayerRecord, PartialPruneError, PruneResult
from sparsecraft.methods.base import LayerStats, Method
from sparsecraft.patterns import Pattern

BlockDone = Callable[[int, PruneResult, list[BlockCall]], None]


def layer_generator(seed: int, fqn: str) -> torch.Generator:
    """A generator that depends only on the seed and the layer name: same seed, same mask."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63))


def reconstruction_error(w: torch.Tensor, w_new: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: tr(dW H dW^T) / tr(W H W^T)."""
    w = w.float()
    dW = w - w_new.float()  # (out, in)
    num = ((dW @ H) * dW).sum()
    den = ((w @ H) * w).sum()
    return float(num / den) if den > 0 else 0.0


def prune_layer(fqn: str, module: nn.Module, collector: LayerCollector, method: Method, sparsity: float,
                pattern: Pattern, seed: int) -> tuple[torch.Tensor, LayerRecord]:
    """Prune one layer in place; return its keep-mask (module layout) and record."""
    t0 = time.perf_counter()
    w = weight_2d(module).detach()  # (out, in)
    stats = LayerStats(
        sqnorm=collector.sqnorm.value if collector.sqnorm is not None else None,
        hessian=collector.hessian.value if "hessian" in method.needs else None,
    )
    w_new, keep = method.prune(w, stats, sparsity, pattern, layer_generator(seed, fqn))
    H = collector.hessian
    error = reconstruction_error(w, w_new, H.value) if H is not None else float("nan")
    set_weight_2d_(module, w_new)
    record = LayerRecord(fqn, tuple(w.shape), sparsity, float((~keep).sum()) / keep.numel(), error,
                         time.perf_counter() - t0)
    return to_module_layout(module, keep.cpu()), record


def prune_block(block: nn.Module, targets: dict[str, nn.Module], plan: dict[str, float], calls: list[BlockCall],
                method: Method, pattern: Pattern, seed: int, device: torch.device | str, result: PruneResult) -> None:
    """Calibrate every target of one block on all batches, then prune each with its planned sparsity."""
    with torch.no_grad(), collect_inputs(targets, method.needs, device) as collectors:
        for call in calls:
            call.run(block, device)
    for fqn, module in targets.items():
        keep, record = prune_layer(fqn, module, collectors[fqn], method, plan[fqn], pattern, seed)
        result.masks[fqn] = keep
        result.layers[fqn] = record


def propagate(block: nn.Module, calls: list[BlockCall], device: torch.device | str) -> None:
    """Replace every batch's hidden states with the (pruned) block's outputs."""
    with torch.no_grad():
        for call in calls:
            out = call.run(block, device)
            if not torch.isfinite(out).all():
                raise ValueError("block outputs contain NaN or inf; try --dtype float32 or check the model weights")
            call.hidden = out.to(call.hidden.device)


def run_oneshot(blocks: nn.ModuleList, blocks_fqn: str, block_targets: list[dict[str, nn.Module]],
                plan: dict[str, float], calls: list[BlockCall], method: Method, pattern: Pattern,
                result: PruneResult, *, seed: int = 0, device: torch.device | str = "cpu", start: int = 0,
                on_block_done: BlockDone | None = None, progress: bool = True) -> PruneResult:
    """Prune blocks ``start..`` in order; ``calls`` hold the inputs of block ``start``."""
    bar = tqdm(range(start, len(blocks)), desc="pruning blocks", unit="block", disable=not progress,
               initial=start, total=len(blocks))
    for i in bar:
        block, targets = blocks[i], block_targets[i]
        home = next(block.parameters()).device
        t0 = time.perf_counter()
        saved = {fqn: weight_2d(m).detach().clone() for fqn, m in targets.items()}
        try:
            block.to(device)
            prune_block(block, targets, plan, calls, method, pattern, seed, device, result)
            propagate(block, calls, device)
        except Exception as e:
            for fqn, m in targets.items():  # the failing block goes back to its original weights
                set_weight_2d_(m, saved[fqn].to(m.weight.device))
                result.masks.pop(fqn, None)
                result.layers.pop(fqn, None)
            if i == start:
                raise
            done = list(range(i))
            raise PartialPruneError(
                f"pruning failed at block {i} ({blocks_fqn}.{i}): {e}. Blocks 0-{i - 1} ARE pruned (masks in "
                f"the error's .result); block {i} was restored. Reload the model before trying again.",
                result, done) from e
        finally:
            block.to(home)
        result.seconds += time.perf_counter() - t0
        if on_block_done is not None:
            on_block_done(i, result, calls)
        bar.set_postfix(sparsity=f"{result.sparsity:.3f}")
    return result
