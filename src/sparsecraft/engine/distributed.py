"""Data-parallel calibration over torch.distributed ranks (gloo on CPU, NCCL on GPUs).

Every rank holds the whole current block and runs ITS share of the calibration batches through it. Per target layer:

- Input norms (Wanda's score; the error estimate of methods without a Hessian) are reduced exactly: each rank keeps the per-batch contributions ``sum_t x_tj^2`` (float64),
  they are gathered and added in global batch order, i.e. the same float64 additions as one process makes, so the
  masks equal the single-process run bit for bit (given the same block outputs per batch).
- Hessians (only for methods that need one: SparseGPT) are running means per rank; they are
  reduced weighted by token counts, ``H = sum_r (n_r / N) H_r``. Float additions in another order: equal to the
  single-process Hessian within rounding, not bit for bit.

Layers are then assigned to ranks for the solve, balanced by cost (``in * in * out``: the reconstruction error and
SparseGPT's solve), each owner broadcasts its new weight, keep-mask and record, and every rank ends the block with
the same weights. A rank that dies makes the collectives of the others fail (gloo: connection closed; otherwise the
process group's timeout), which is reported as a ``RankFailure`` naming the step.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sparsecraft.engine.blocks import weight_2d
from sparsecraft.engine.capture import BlockCall
from sparsecraft.engine.hooks import LayerCollector
from sparsecraft.engine.loop import prune_layer
from sparsecraft.engine.record import PruneResult
from sparsecraft.methods.base import Method
from sparsecraft.patterns import Pattern
from sparsecraft.stats import Hessian, InputSqNorm

T = TypeVar("T")


class RankFailure(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or raised before reaching it."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size and the device collectives run on (CUDA for NCCL)."""

    rank: int = 0
    world: int = 1
    comm_device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "DistContext":
        """The default process group if one is initialised, else a single process."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        nccl = dist.get_backend() == "nccl"
        comm = f"cuda:{torch.cuda.current_device()}" if nccl else "cpu"
        return cls(dist.get_rank(), dist.get_world_size(), comm)


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistContext:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    ``backend`` None picks NCCL when CUDA is present, else gloo. ``timeout_s`` bounds how long a rank waits for a
    peer that hangs (a peer that dies is usually noticed at once). A single process (no WORLD_SIZE) returns rank 0
    of 1 without creating a group.
    """
    if dist.is_initialized():
        return DistContext.current()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext.current()


def collective(ctx: DistContext, what: str, fn: Callable[[], T]) -> T:
    """Run one collective step; turn the backend's error into one that says what happened and what to do."""
    try:
        return fn()
    except (RuntimeError, ConnectionError) as e:
        if isinstance(e, RankFailure):
            raise
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RankFailure(
            f"rank {ctx.rank}/{ctx.world}: {what} failed because another rank died, raised an error or timed out "
            f"({first}). Fix the failing rank (its own error is in its log) and rerun with resume to continue from "
            f"the last finished block") from e


def gather_objects(ctx: DistContext, obj: Any, what: str) -> list[Any]:
    if ctx.world == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world
    collective(ctx, what, lambda: dist.all_gather_object(out, obj))
    return out


def barrier(ctx: DistContext, what: str) -> None:
    if ctx.world > 1:
        collective(ctx, what, lambda: dist.barrier())


def check_same_settings(ctx: DistContext, fingerprint: dict[str, Any]) -> None:
    """Before any work: every rank must run the same settings on the same data, or all ranks stop."""
    mine = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    every = gather_objects(ctx, mine, "the settings check")
    bad = sorted({(r, k) for r, fp in enumerate(every) for k in set(fp) | set(every[0])
                  if fp.get(k) != every[0].get(k)})
    if bad:
        where = ", ".join(f"rank {r}: {k}" for r, k in bad[:8])
        raise ValueError(f"ranks disagree on the settings of the run ({where}, compared with rank 0); start every "
                         f"rank with the same command, model files and calibration data")


def split_batches(n_batches: int, ctx: DistContext) -> range:
    """This rank's contiguous share of the global batch indices (rank order = batch order, for exact reduction)."""
    lo, hi = n_batches * ctx.rank // ctx.world, n_batches * (ctx.rank + 1) // ctx.world
    return range(lo, hi)


def assign_layers(shapes: dict[str, tuple[int, int]], world: int) -> dict[str, int]:
    """fqn -> owning rank; longest-processing-time greedy on cost ``in * in * out`` (ties: block order, low rank)."""
    load = [0] * world
    owners = {}
    order = sorted(shapes, key=lambda f: (-shapes[f][1] ** 2 * shapes[f][0], list(shapes).index(f)))
    for fqn in order:
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[fqn] = rank
        load[rank] += shapes[fqn][1] ** 2 * shapes[fqn][0]
    return owners


class _Recorder:
    """One layer's inputs on this rank: per-call float64 sqnorm contributions (kept apart for an exact global
    sum) and a local running-mean Hessian."""

    def __init__(self, fqn: str, features: int, needs: tuple[str, ...], device: torch.device | str) -> None:
        self.fqn = fqn
        self.contribs: list[torch.Tensor] = []  # input norms: always (Wanda's score, everyone's error estimate)
        self.tokens = 0
        self.hessian = Hessian(features, device) if "hessian" in needs else None

    def update(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise ValueError(f"calibration activations entering {self.fqn} contain NaN or inf; check the weights of "
                             f"the earlier layers and the dtype (try --dtype float32)")
        x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.contribs.append(x2.pow(2).sum(0).double().cpu())  # same expression as InputSqNorm.update
        self.tokens += x2.shape[0]
        if self.hessian is not None:
            self.hessian.update(x2)


@contextmanager
def record_inputs(targets: dict[str, nn.Module], needs: tuple[str, ...],
                  device: torch.device | str) -> Iterator[dict[str, _Recorder]]:
    recorders = {fqn: _Recorder(fqn, weight_2d(m).shape[1], needs, device) for fqn, m in targets.items()}
    handles = []
    try:
        for fqn, module in targets.items():
            r = recorders[fqn]
            handles.append(module.register_forward_hook(lambda _m, inp, _out, r=r: r.update(inp[0])))
        yield recorders
    finally:
        for h in handles:
            h.remove()


def reduce_stats(ctx: DistContext, module: nn.Module, rec: _Recorder, needs: tuple[str, ...],
                 device: torch.device | str) -> LayerCollector:
    """The global statistics of one layer, as a LayerCollector the single-process solver understands."""
    collector = LayerCollector(module, rec.fqn, needs, device)
    counts = gather_objects(ctx, rec.tokens, f"token counts of {rec.fqn}")
    total = sum(counts)
    parts = gather_objects(ctx, rec.contribs, f"input norms of {rec.fqn}")
    for c in (c for part in parts for c in part):  # global batch order: rank 0's batches come first
        collector.sqnorm.sum += c
    collector.sqnorm.count = total
    if rec.hessian is None:
        return collector
    H = rec.hessian.H.double().mul_(rec.tokens / total if total else 0.0).to(ctx.comm_device)
    collective(ctx, f"Hessian of {rec.fqn}", lambda: dist.all_reduce(H))
    assert collector.hessian is not None
    collector.hessian.H = H.float().to(collector.hessian.H.device)
    collector.hessian.count = total
    return collector


def prune_block_distributed(ctx: DistContext, block: nn.Module, targets: dict[str, nn.Module],
                            plan: dict[str, float], calls: Sequence[BlockCall], method: Method, pattern: Pattern,
                            seed: int, device: torch.device | str, result: PruneResult) -> None:
    """``loop.prune_block`` across ranks: local calibration, reduced statistics, owner solves, broadcast."""
    with torch.no_grad(), record_inputs(targets, method.needs, device) as recorders:
        for call in calls:
            call.run(block, device)
    owners = assign_layers({f: tuple(weight_2d(m).shape) for f, m in targets.items()}, ctx.world)
    collectors = {f: reduce_stats(ctx, m, recorders[f], method.needs, device) for f, m in targets.items()}
    del recorders
    records, errors = {}, []
    for fqn, module in targets.items():
        if owners[fqn] != ctx.rank:
            continue
        try:
            result.masks[fqn], records[fqn] = prune_layer(fqn, module, collectors[fqn], method, plan[fqn], pattern,
                                                          seed)
        except Exception as e:  # reported on every rank below, so that no rank waits for a broadcast forever
            errors.append(f"{fqn} (rank {ctx.rank}): {e}")
    failed = [e for part in gather_objects(ctx, errors, "the solve") for e in part]
    if failed:
        raise ValueError(f"pruning failed: {'; '.join(failed[:3])}")
    for fqn, module in targets.items():
        _broadcast_layer(ctx, fqn, module, owners[fqn], result)
    for part in gather_objects(ctx, records, "the layer records"):
        result.layers.update(part)


def _broadcast_layer(ctx: DistContext, fqn: str, module: nn.Module, owner: int, result: PruneResult) -> None:
    w = module.weight.data
    buf = w.to(ctx.comm_device)
    collective(ctx, f"broadcast of {fqn}", lambda: dist.broadcast(buf, src=owner))
    keep = result.masks[fqn].to(ctx.comm_device, torch.uint8) if ctx.rank == owner \
        else torch.empty(w.shape, dtype=torch.uint8, device=ctx.comm_device)
    collective(ctx, f"broadcast of {fqn}'s mask", lambda: dist.broadcast(keep, src=owner))
    if ctx.rank != owner:
        w.copy_(buf)
        result.masks[fqn] = keep.bool().cpu()
