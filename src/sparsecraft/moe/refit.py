"""Refit the down projections of a MoEfied MLP for its routing (training-free expert compensation).

With top-k routing a token loses the output of the experts it does not run. Part of that loss is predictable from the
neurons that do run, so per MoEMLP we solve, on calibration inputs x (N, H) of that MLP, for new down weights D'
(H, I) of every expert (shared included):

    min_D'  || y - A_m D'^T ||^2  +  lam || D' - D ||^2,     lam = ridge * mean diag(A_m^T A_m)

    y    = A D^T          (N, H)  the output with EVERY expert run (= the dense MLP right after ``moefy_``)
    A_m  = A * mask       (N, I)  neuron activations act(gate x) * up x, zero outside the token's chosen experts
    D'^T = (A_m^T A_m + lam I)^-1 (A_m^T y + lam D^T)

The ridge pulls toward the original D, so neurons of experts that calibration tokens never choose keep their
weights, and with top_k = E (mask = 1) the solution is D itself. The objective at D' is at most its value at D, so the
calibration error can only fall. gate / up and the routers are unchanged; the fit is for the module's current
``top_k`` (refit again after ``set_top_k_``), and afterwards the MoE with every expert no longer equals the dense MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsecraft.modules.moe_mlp import MoEMLP


def expert_activations(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """x (N, H) -> neuron activations (N, Is + E * Ie): shared neurons first, then expert 0, 1, ... (dense order)."""
    ie = moe.gate_up.shape[1] // 2
    gu = torch.einsum("nh,eih->nei", x, moe.gate_up)  # (N, E, 2Ie)
    a = (moe.act_fn(gu[..., :ie]) * gu[..., ie:]).flatten(1)  # (N, E*Ie)
    if moe.shared_gate_up is None:
        return a
    gate, up = torch.nn.functional.linear(x, moe.shared_gate_up).chunk(2, dim=-1)  # (N, Is) each
    return torch.cat([moe.act_fn(gate) * up, a], dim=1)


def _dense_down(moe: MoEMLP) -> torch.Tensor:
    """(H, Is + E * Ie) down weights in the order of ``expert_activations``."""
    E, H, ie = moe.down.shape
    routed = moe.down.permute(1, 0, 2).reshape(H, E * ie)  # (H, E*Ie)
    return routed if moe.shared_down is None else torch.cat([moe.shared_down, routed], dim=1)


def routing_mask(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """(N, Is + E * Ie) float mask: 1 for the shared neurons and the neurons of each token's chosen experts."""
    E, _, ie = moe.down.shape
    chosen = torch.zeros(x.shape[0], E, dtype=x.dtype, device=x.device).scatter_(1, moe.route(x), 1.0)  # (N, E)
    mask = chosen.repeat_interleave(ie, dim=1)  # (N, E*Ie)
    if moe.shared_down is None:
        return mask
    return torch.cat([mask.new_ones(x.shape[0], moe.shared_down.shape[1]), mask], dim=1)


def solve_down(A: torch.Tensor, mask: torch.Tensor, D: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge solution D' (H, I) of the module docstring; A, mask (N, I), D (H, I). Solved in float64."""
    A, D = A.double(), D.double()
    y = A @ D.T  # (N, H)
    Am = A * mask.double()  # (N, I)
    G = Am.T @ Am  # (I, I)
    lam = ridge * G.diagonal().mean().clamp_min(1e-30)
    G.diagonal().add_(lam)
    return torch.linalg.solve(G, Am.T @ y + lam * D.T).T  # (H, I)


@torch.no_grad()
def refit_down_(model: nn.Module, inputs: dict[str, torch.Tensor],
                ridge: float = 0.3) -> dict[str, tuple[float, float]]:
    """Refit every MoEMLP named in ``inputs`` (fqn -> its calibration inputs (N, H), e.g. from ``mlp_inputs`` on the
    dense model) in place -> fqn -> (relative squared output error before, after) on those inputs."""
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0 (it keeps never-chosen neurons at their weights), got {ridge}")
    errors = {}
    for fqn, x in inputs.items():
        moe = model.get_submodule(fqn)
        if not isinstance(moe, MoEMLP):
            raise ValueError(f"{fqn} is not a MoEMLP; run moefy_ first or pass the fqns of its MoE MLPs")
        x = x.to(moe.down.device, moe.down.dtype)
        A, mask, D = expert_activations(moe, x), routing_mask(moe, x), _dense_down(moe)
        D_new = solve_down(A, mask, D, ridge)
        y, Am = A.double() @ D.double().T, A.double() * mask.double()
        err = [float((y - Am @ d.T).square().sum() / y.square().sum()) for d in (D.double(), D_new)]
        errors[fqn] = (err[0], err[1])
        D_new = D_new.to(D.dtype)
        s = 0 if moe.shared_down is None else moe.shared_down.shape[1]
        if s:
            moe.shared_down.copy_(D_new[:, :s])
        E, H, ie = moe.down.shape
        moe.down.copy_(D_new[:, s:].reshape(H, E, ie).permute(1, 0, 2))
    return errors
