"""Preconditioned conjugate gradient for the optimal weights on a FIXED support, every row at once.

For a keep-mask K the layer objective tr((W - V) H (W - V)^T) is minimised over V supported on K by solving, for
every output row i with support S_i, the normal equations H[S_i, S_i] v = (H w_i)[S_i]. Written without gathering:
with P = projection onto the support (zeroing pruned entries), solve

    A(V) = P(V H) = P(W H) = B,   V = P(V)

which is symmetric positive semi-definite on the support, so CG applies row by row; rows run in parallel as one
(out, in) @ (in, in) product per iteration. The Jacobi preconditioner diag(H) is what ALPS uses (Meng et al. 2024,
arXiv:2406.07831, Sec. 3.2): it makes the iteration count nearly independent of the input scales.
"""

from __future__ import annotations

import torch


def pcg_on_support(
    W: torch.Tensor,  # (out, in) dense weights (the target of the reconstruction)
    H: torch.Tensor,  # (in, in) Hessian, positive semi-definite (damp it for few calibration tokens)
    keep: torch.Tensor,  # (out, in) bool support
    V0: torch.Tensor,  # (out, in) starting point (zero where ~keep)
    iters: int = 50,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Returns V (out, in) float32, zero where ~keep, minimising the objective on the support. Pure."""
    Hf = H.float()
    P = keep.float()  # (out, in)
    Minv = 1.0 / torch.diag(Hf).clamp_min(1e-12 * float(torch.diag(Hf).abs().mean().clamp_min(1e-30)))  # (in,)
    V = V0.float() * P
    R = (W.float() @ Hf - V @ Hf) * P  # residual B - A(V), (out, in)
    Z = R * Minv
    D = Z.clone()  # search directions
    rz = (R * Z).sum(1)  # (out,)
    stop = tol * tol * (W.float() @ Hf * P).pow(2).sum(1).clamp_min(1e-30)  # relative to |B_i|^2
    for _ in range(iters):
        active = (R * R).sum(1) > stop  # (out,) rows that have not converged
        if not active.any():
            break
        AD = (D @ Hf) * P  # (out, in)
        dAd = (D * AD).sum(1)
        alpha = torch.where(active & (dAd > 0), rz / dAd.clamp_min(1e-30), torch.zeros_like(rz))
        V += alpha.unsqueeze(1) * D
        R -= alpha.unsqueeze(1) * AD
        Z = R * Minv
        rz_new = (R * Z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        D = Z + beta.unsqueeze(1) * D
        rz = rz_new
    return V * P
