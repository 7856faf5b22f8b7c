"""Learned structure masks: hard-concrete (L0) gates over MLP neurons, KV groups and whole blocks, trained with a
distillation loss towards the ungated model while the weights stay frozen; the gates' ``log_alpha`` is then the
score (higher = keep) that chooses what ``shrink`` removes at the planned uniform widths.

Hard-concrete gate (Louizos et al. 2018, https://arxiv.org/abs/1712.01312, eq. 9-12), one per structure:
    u ~ U(0, 1);  s = sigmoid((log u - log(1 - u) + log_alpha) / beta);  z = clamp(s (zeta - gamma) + gamma, 0, 1)
    deterministic (eval) gate: z = clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)
    P(z > 0) = sigmoid(log_alpha - beta log(-gamma / zeta))      (the expected L0 norm, differentiable)
with beta = 2/3, gamma = -0.1, zeta = 1.1. ``INIT_LOG_ALPHA`` = 3 > log(11) puts every deterministic gate at exactly 1,
so a freshly gated model computes exactly what the dense model computes.

The size constraint holds by construction: each row of gates (the neurons of one block, the KV groups of one block,
or all blocks) is shifted, log_alpha - c, with c >= 0 the shift that makes the row's expected kept fraction
mean P(z > 0) equal the target t (bisection, then one Newton step taken with autograd on, which gives the implicit
gradient dc/dlog_alpha at the solution). t falls linearly from 1 to the planned fraction over the first ``warmup`` of
the steps, and c = 0 while the row already keeps less than t, so the gates start at their initial value. Why not
CoFi's Lagrangian (Xia et al. 2022, https://arxiv.org/abs/2204.00408, eq. 6) with multipliers trained by ascent: in
the few dozen steps affordable here it oscillated (measured on the tiny LLaMA at goal 0.5: the expected kept fraction
ended anywhere from 0.001 to 0.94 as the learning rates changed); with the shift it ends on the target every time.
The ranking inside a row (what ``shrink`` uses: top-k per block) does not depend on c.

Where the gates act (forward hooks, removed in ``finally``):
- MLP neuron j of block i: column j of the MLP consumer's input is multiplied by z_mlp[i, j];
- KV group g: the ``r * head_dim`` channels of its query heads in the attention output projection's input;
- block i: its output y becomes where(z == 0, x, y - (1 - z)(y - x)) with x its input, exact at both ends (z = 1 is
  the block, z = 0 is the identity, i.e. the block removed).
A hard 0/1 mask through the same hooks therefore equals physical removal up to float summation order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sparsecraft.engine.blocks import find_blocks, weight_2d
from sparsecraft.structured.arch import ArchSpec, head_dim, kv_heads
from sparsecraft.structured.distill import kd_loss

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
INIT_LOG_ALPHA = 3.0  # > log(11) = 2.398: sigmoid(3) * 1.2 - 0.1 = 1.0286 -> deterministic gate exactly 1
GATED_AXES = ("mlp", "heads", "depth")


def sample_gate(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic hard-concrete gate, same shape as ``log_alpha``, values in [0, 1] with mass at 0 and 1."""
    u = torch.rand(log_alpha.shape, generator=generator, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
    u = u.to(log_alpha.device)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def mean_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """Deterministic gate (the eval-time value)."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def keep_prob(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0): the differentiable expected L0 norm of each gate."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


@dataclass(frozen=True)
class GateConfig:
    steps: int = 64  # optimizer steps over the calibration windows (cycled)
    batch_size: int = 2  # windows per step
    lr: float = 0.1  # Adam on log_alpha
    warmup: float = 0.5  # fraction of the steps over which the target falls from 1 to the planned fraction
    temperature: float = 1.0  # distillation temperature
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"gate training needs steps >= 1 and batch_size >= 1, got {self.steps} and "
                             f"{self.batch_size}; raise --learn-steps")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"gate warmup is a fraction of the steps in [0, 1], got {self.warmup}")


def gate_shapes(model: nn.Module, spec: ArchSpec, axes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Axis -> shape of its gate tensor: mlp (L, F), heads (L, G KV groups), depth (L,)."""
    _, blocks = find_blocks(model)
    L = len(blocks)
    shapes: dict[str, tuple[int, ...]] = {}
    if "mlp" in axes:
        shapes["mlp"] = (L, weight_2d(blocks[0].get_submodule(spec.mlp_out)).shape[1])
    if "heads" in axes:
        shapes["heads"] = (L, kv_heads(model.config))
    if "depth" in axes:
        shapes["depth"] = (L,)
    return shapes


def init_log_alpha(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {a: torch.full(s, INIT_LOG_ALPHA) for a, s in shapes.items()}


@contextmanager
def gated(model: nn.Module, spec: ArchSpec, z: dict[str, torch.Tensor | None]) -> Iterator[None]:
    """Install the gate hooks for the duration of the block. The hooks read ``z`` at call time, so the caller may
    swap its entries between forwards (None or a missing axis = that axis ungated)."""
    _, blocks = find_blocks(model)
    width = head_dim(model.config) * (model.config.num_attention_heads // kv_heads(model.config)) if spec.q else 0
    handles = []

    def channels(axis: str, i: int, repeat: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            g = z.get(axis)
            if g is None:
                return None
            gate = g[i].repeat_interleave(repeat) if repeat > 1 else g[i]  # (channels,)
            return (args[0] * gate.to(args[0].dtype), *args[1:])
        return hook

    def block_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: object) -> object:
            g = z.get("depth")
            if g is None:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            zi = g[i].to(y.dtype)
            y = torch.where(zi == 0, x, y - (1 - zi) * (y - x))
            return (y, *out[1:]) if isinstance(out, tuple) else y
        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.get_submodule(spec.mlp_out).register_forward_pre_hook(channels("mlp", i, 1)))
            if spec.o:
                handles.append(block.get_submodule(spec.o).register_forward_pre_hook(channels("heads", i, width)))
            handles.append(block.register_forward_hook(block_hook(i), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def hard_masks(log_alpha: dict[str, torch.Tensor], keep: dict[str, int]) -> dict[str, torch.Tensor]:
    """0/1 gates keeping the ``keep[axis]`` highest log_alpha per block (mlp, heads) or over blocks (depth)."""
    out = {}
    for axis, la in log_alpha.items():
        k = keep[axis]
        order = torch.argsort(-la, dim=-1, stable=True)[..., :k]  # ties keep the lower index
        out[axis] = torch.zeros_like(la).scatter_(-1, order, 1.0)
    return out


def budget_shift(log_alpha: torch.Tensor, target: float) -> torch.Tensor:
    """c >= 0 per row (shape log_alpha.shape[:-1]) with mean(keep_prob(log_alpha - c), -1) = target where that needs
    c > 0, else 0. Differentiable in log_alpha (implicit gradient, see the module docstring)."""
    with torch.no_grad():
        lo = torch.zeros(log_alpha.shape[:-1], dtype=torch.float64, device=log_alpha.device)
        hi = lo + float(log_alpha.max() - log_alpha.min()) + 40.0  # keep_prob(-40 + ...) ~ 1e-17 < any target
        la = log_alpha.double()
        for _ in range(60):  # bisection: the mean kept fraction falls as c grows
            mid = (lo + hi) / 2
            over = keep_prob(la - mid[..., None]).mean(-1) > target
            lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
        c0 = ((lo + hi) / 2).to(log_alpha.dtype)
        needed = keep_prob(la).mean(-1) > target  # rows already at or below the target keep c = 0
    p = keep_prob(log_alpha - c0[..., None])  # (..., n)
    c = c0 + (p.mean(-1) - target) / (p * (1 - p)).mean(-1).clamp_min(1e-12)  # Newton step: value c0, grad dc/dla
    return torch.where(needed, c, torch.zeros_like(c))


def _target(step: int, config: GateConfig, goal: float) -> float:
    ramp = max(1, round(config.warmup * config.steps))
    return 1 - (1 - goal) * min(1.0, step / ramp)


def learn_gates(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, goals: dict[str, float],
                config: GateConfig = GateConfig()) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train gates on ``goals`` (axis -> fraction of its structures to keep) with the model frozen.

    windows (n, T) token ids; the teacher is the same model with the gates off. -> (the shifted log_alpha per axis
    (CPU float32; its expected kept fraction is the goal), a summary: steps, seconds, last distillation loss, expected kept fraction per axis)."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    log_alpha = {a: p.to(device).requires_grad_(True)
                 for a, p in init_log_alpha(gate_shapes(model, spec, tuple(goals))).items()}
    opt = torch.optim.Adam(list(log_alpha.values()), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    z: dict[str, torch.Tensor | None] = {}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    kd = torch.tensor(0.0)
    try:
        with torch.enable_grad(), gated(model, spec, z):
            for step in range(config.steps):
                start = (step * config.batch_size) % windows.shape[0]
                batch = windows[start:start + config.batch_size].to(device)
                z.clear()
                with torch.no_grad():
                    teacher = model(input_ids=batch, use_cache=False).logits
                for a, la in log_alpha.items():
                    z[a] = sample_gate(la - budget_shift(la, _target(step, config, goals[a]))[..., None], gen)
                kd = kd_loss(model(input_ids=batch, use_cache=False).logits, teacher, config.temperature)
                opt.zero_grad()
                kd.backward()
                opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    out = {a: (la - budget_shift(la, goals[a])[..., None]).detach().float().cpu() for a, la in log_alpha.items()}
    summary = {"steps": config.steps, "seconds": time.perf_counter() - t0, "kd_loss": float(kd.detach()),
               **{f"expected_{a}": float(keep_prob(la).mean()) for a, la in out.items()}}
    return out, summary
