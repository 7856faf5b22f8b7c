"""ALPS-style pruning: ADMM at the target sparsity with an increasing penalty, then PCG on the final support
(Meng, Behdin, Wang, Mazumder 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning", arXiv:2406.07831).

Same splitting as solvers/admm.py (V dense, Z sparse, U scaled dual, Jacobi-scaled coordinates), but Z is projected
onto the FULL target pattern from the first iteration, starting from a given mask, and the penalty rho grows on a
schedule driven by how much the support still moves (Sec. 3.1): every ``check_every`` iterations, with c the number
of entries that entered or left the support and k the number kept,

    rho *= 1.3 if c >= 0.1 k,  1.2 if c >= 0.005 k,  1.1 otherwise,  and stop once c = 0 and rho >= rho_stop.

A growing rho forces V and Z together, so the support settles; the paper proves convergence under this schedule.
Because rho changes, (Hs + rho I)^-1 comes from one eigendecomposition Hs = Q diag(lam) Q^T: each iteration is two
GEMMs. The settled support is then refined exactly by preconditioned CG (solvers/cg.py).
"""

from __future__ import annotations

import torch

from sparsecraft.patterns import Pattern, Scope
from sparsecraft.solvers.admm import project, scaled_hessian
from sparsecraft.solvers.cg import pcg_on_support


def rho_factor(changed: int, kept: int) -> float:
    """The penalty multiplier for a support that changed in ``changed`` of ``kept`` entries since the last check."""
    if changed >= 0.1 * kept:
        return 1.3
    if changed >= 0.005 * kept:
        return 1.2
    return 1.1


def alps_solve(
    W: torch.Tensor,  # (out, in)
    H: torch.Tensor,  # (in, in)
    keep0: torch.Tensor,  # (out, in) bool starting support (e.g. Wanda's), of the target pattern
    sparsity: float,
    pattern: Pattern,
    scope: Scope = "row",
    iters: int = 60,
    rho: float = 0.1,
    rho_stop: float = 10.0,
    check_every: int = 3,
    cg_iters: int = 50,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (V (out, in) float32 zero where ~keep, keep (out, in) bool). Pure."""
    if not (iters >= 0 and rho > 0 and rho_stop >= rho and check_every >= 1 and cg_iters >= 0 and dampening >= 0):
        raise ValueError(f"alps needs iters >= 0, 0 < rho <= rho_stop, check_every >= 1, cg_iters >= 0, dampening "
                         f">= 0; got {iters}, {rho}, {rho_stop}, {check_every}, {cg_iters}, {dampening}")
    d, Hs = scaled_hessian(H.to(W.device), dampening)
    lam, Q = torch.linalg.eigh(Hs.double())  # Hs = Q diag(lam) Q^T, float64 for accuracy of small eigenvalues
    lam, Q = lam.float().clamp_min(0), Q.float()
    Ws = W.detach().float() * d  # (out, in)
    BQ = (Ws @ Hs) @ Q  # (out, in): W Hs in the eigenbasis
    keep = keep0.clone()
    V, U = Ws.clone(), torch.zeros_like(Ws)
    Z = Ws * keep
    last = keep.clone()
    for k in range(iters):
        V = ((BQ + rho * ((Z - U) @ Q)) / (lam + rho)) @ Q.T  # (Hs + rho I)^-1 applied in the eigenbasis
        keep = project((V + U).abs(), sparsity, pattern, scope)
        Z = (V + U) * keep
        U += V - Z
        if (k + 1) % check_every == 0:
            changed = int((keep != last).sum())
            if changed == 0 and rho >= rho_stop:
                break
            rho *= rho_factor(changed, int(keep.sum()))
            last = keep.clone()
    Hd = H.detach().float().to(W.device) / d.unsqueeze(0) / d.unsqueeze(1)  # undamped, scaled
    Vs = pcg_on_support(Ws, Hd + dampening * torch.eye(Hd.shape[0], device=W.device), keep, Z, cg_iters)
    return Vs / d, keep
