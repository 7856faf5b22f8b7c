"""ADMM weight update with a gradually tightened mask (Boza 2024, "Fast and Optimal Weight Update for Pruned Large
Language Models", arXiv:2401.02938).

The layer-wise problem: minimise f(V) = tr((W - V) H (W - V)^T) over V with a sparsity pattern, H = 2/N X^T X
(in, in), W (out, in) the dense weights. ADMM splits V into a dense copy V and a sparse copy Z with scaled dual U:

    V <- (W H + rho (Z - U)) (H + rho I)^-1        (ridge-regularised least squares, one GEMM per iteration)
    Z <- project(V + U)                             (keep the pattern's largest entries, zero the rest)
    U <- U + V - Z

Everything runs in Jacobi-scaled coordinates: with d = sqrt(diag H), Hs = H / (d d^T) has a unit diagonal and
Ws = W * d, so |Ws| is exactly the Wanda score and one rho suits every layer. The mask is tightened on the cubic
schedule s_t = s (1 - (1 - t/T)^3) (Zhu & Gupta 2017, as in the paper) during the first ``mask_iters`` iterations,
then fixed while the weights converge; the result is Z (exactly sparse).
"""

from __future__ import annotations

import torch

from sparsecraft.patterns import NM, Block, Pattern, Scope, Unstructured, topk_mask


def layer_objective(W: torch.Tensor, V: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - V) H (W - V)^T) in float64: the layer-wise error every solver here minimises."""
    D = W.double() - V.double()  # (out, in)
    return float(((D @ H.double()) * D).sum())


def scaled_hessian(H: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H (in, in) -> (d (in,), Hs (in, in)) with Hs = H / (d d^T) + dampening * I. Pure.

    Inputs that were always zero (H_jj = 0) get d_j = 1 and Hs_jj = 1: the weight there does not change f.
    """
    Hf = H.detach().float()
    diag = torch.diag(Hf)
    d = torch.where(diag > 0, diag.clamp_min(0).sqrt(), torch.ones_like(diag))  # (in,)
    Hs = Hf / d.unsqueeze(0) / d.unsqueeze(1)
    dead = diag <= 0
    Hs[dead, dead] = 1.0
    Hs.diagonal().add_(dampening)
    return d, Hs


def project(score: torch.Tensor, sparsity: float, pattern: Pattern, scope: Scope) -> torch.Tensor:
    """keep-mask of ``pattern`` at ``sparsity`` from magnitudes ``score`` (out, in) (N:M ignores ``sparsity``)."""
    return topk_mask(score, None if isinstance(pattern, NM) else sparsity, pattern, scope)


def schedule_pattern(pattern: Pattern, sparsity: float, t: int, T: int) -> tuple[float, Pattern]:
    """(sparsity, pattern) of mask update t = 1..T: cubic ramp to ``sparsity``; N:M only at the last update."""
    s_t = sparsity * (1.0 - (1.0 - t / T) ** 3)
    if t >= T:
        return sparsity, pattern
    if isinstance(pattern, NM):
        return s_t, Unstructured()
    return s_t, pattern


def admm_gradual(
    W: torch.Tensor,  # (out, in)
    H: torch.Tensor,  # (in, in)
    sparsity: float,
    pattern: Pattern,
    scope: Scope = "row",
    iters: int = 40,
    mask_iters: int = 30,
    update_every: int = 3,
    rho: float = 1.0,
    dampening: float = 0.01,
    keep: torch.Tensor | None = None,  # (out, in) bool: a fixed mask (weight update only, no mask search)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (V (out, in) float32, keep (out, in) bool) with exactly the pattern's zeros. Pure."""
    if not isinstance(pattern, (Unstructured, NM, Block)):
        raise ValueError(f"admm: unknown pattern {pattern!r}")
    if not (iters >= 1 and 1 <= mask_iters <= iters and update_every >= 1 and rho > 0 and dampening >= 0):
        raise ValueError(f"admm needs iters >= mask_iters >= 1, update_every >= 1, rho > 0 and dampening >= 0; got "
                         f"iters={iters}, mask_iters={mask_iters}, update_every={update_every}, rho={rho}, "
                         f"dampening={dampening}")
    d, Hs = scaled_hessian(H.to(W.device), dampening)
    Ws = W.detach().float() * d  # (out, in), |Ws| = Wanda score
    A = torch.cholesky_inverse(torch.linalg.cholesky(Hs + rho * torch.eye(Hs.shape[0], device=W.device)))  # (in, in)
    B = Ws @ Hs  # (out, in)
    V, U = Ws.clone(), torch.zeros_like(Ws)
    T = len(range(0, mask_iters, update_every))  # number of mask updates
    fixed = keep is not None
    keep = keep.clone() if fixed else torch.ones_like(Ws, dtype=torch.bool)
    for k in range(iters):
        if not fixed and k < mask_iters and k % update_every == 0:
            s_t, p_t = schedule_pattern(pattern, sparsity, k // update_every + 1, T)
            keep = project((V + U).abs(), s_t, p_t, scope)
        Z = (V + U) * keep
        U += V - Z
        V = (B + rho * (Z - U)) @ A
    return Z / d, keep


def best_of(W: torch.Tensor, H: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor],
            candidate: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight, keep) pair with the lower layer objective (undamped H, float64); ties keep ``start``.

    This is the never-worse guarantee of the ADMM methods against the mask they started from.
    """
    if layer_objective(W, candidate[0], H) < layer_objective(W, start[0], H):
        return candidate
    return start
