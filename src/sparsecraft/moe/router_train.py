"""Distil the dense model into its MoEfied copy by training the routers, and optionally the experts (LLaMA-MoE's
second stage).

Loss: KL(teacher || student) of the next-token distributions on token windows, teacher = the dense model. Every
MoEMLP runs in its relaxed mode (all experts computed, hard top-k forward, straight-through soft mask backward; see
``modules/moe_mlp.py``). ``router_weight`` / ``router_bias`` are trained with ``lr``; with ``expert_lr > 0`` the
experts' ``gate_up`` / ``down`` (and the shared expert's) are trained too, with their own learning rate (experts
start from the dense weights, which a router-sized step would wreck). Everything else is frozen, and the modules
return to exact sparse execution (and the parameters to their ``requires_grad``) when training ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from sparsecraft.modules.moe_mlp import MoEMLP
from sparsecraft.structured.distill import kd_loss


@dataclass(frozen=True)
class RouterTrainConfig:
    steps: int = 100
    batch_size: int = 4  # windows per step
    lr: float = 1e-3  # Adam, routers
    expert_lr: float = 0.0  # Adam, experts' gate_up / down (shared included); 0 = routers only
    max_seconds: float | None = None  # stop after the step that passes this wall-clock budget
    temperature: float = 0.5  # soft-mask width in units of the per-token score std
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.temperature <= 0 or self.expert_lr < 0 \
                or (self.max_seconds is not None and self.max_seconds <= 0):
            raise ValueError("steps and batch_size must be >= 1, lr, temperature and max_seconds > 0, expert_lr >= 0")


def train_routers_(model: nn.Module, teacher: nn.Module, windows: torch.Tensor,
                   config: RouterTrainConfig) -> list[float]:
    """Train every MoEMLP router (and with ``expert_lr`` its experts) of ``model`` in place on ``windows`` (n, T)
    token ids; -> loss per step."""
    moes = [m for m in model.modules() if isinstance(m, MoEMLP)]
    if not moes:
        raise ValueError("the model has no MoEMLP to train; run moefy_ first")
    params = [p for m in moes for p in (m.router_weight, m.router_bias)]
    experts = [p for m in moes for p in (m.gate_up, m.down, m.shared_gate_up, m.shared_down) if p is not None]
    experts = experts if config.expert_lr > 0 else []
    flags = {p: p.requires_grad for p in model.parameters()}
    g = torch.Generator().manual_seed(config.seed)
    losses = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params + experts:
            p.requires_grad_(True)
        for m in moes:
            m.relax = config.temperature
        groups = [{"params": params, "lr": config.lr}]
        if experts:
            groups.append({"params": experts, "lr": config.expert_lr})
        opt = torch.optim.Adam(groups)
        device = params[0].device
        start = time.perf_counter()
        for _ in range(config.steps):
            batch = windows[torch.randint(0, windows.shape[0], (config.batch_size,), generator=g)].to(device)
            with torch.no_grad():
                target = teacher(batch).logits
            loss = kd_loss(model(batch).logits, target)  # mean per-token KL(teacher || student)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
                break  # at least one step always runs
    finally:
        for m in moes:
            m.relax = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return losses
