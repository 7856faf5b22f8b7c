"""The OBS column-block solve of SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774).

Symbols follow the paper: ``H`` is the layer Hessian 2/N X^T X (in, in); ``Hinv`` the upper Cholesky factor
of its inverse. Columns are processed left to right in blocks; pruning column i changes the not-yet-processed
columns by ``-err_i * Hinv[i, i:]`` so the layer output is reconstructed as well as possible (eq. 3-5).

This function is longer than the style guide's p90 on purpose: it is one algorithm and reads best in one place.
"""

from __future__ import annotations

import torch

from sparsecraft.patterns import NM, Pattern, Unstructured, num_pruned, prune_lowest


def inverse_hessian_factor(H: torch.Tensor, dampening: float) -> torch.Tensor:
    """H (in, in) -> upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, float32. Pure."""
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: the weight there does not matter
    H[dead, dead] = 1.0
    H.diagonal().add_(dampening * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise ValueError(
            f"SparseGPT: the damped Hessian is not positive definite (Cholesky failed at dampening={dampening}); "
            f"raise the dampening, e.g. dampening={min(1.0, dampening * 10):g} (CLI: --dampening), "
            f"or use more calibration samples"
        ) from None


def sparsegpt_solve(
    W: torch.Tensor,  # (out, in)
    H: torch.Tensor,  # (in, in)
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (reconstructed weight (out, in) in W's dtype, keep (out, in) bool). Pure.

    Unstructured: in each column block the mask is chosen by w^2 / [Hinv]_ii^2 across the whole block, with the
    block's prune count split so that the layer loses exactly round(sparsity * numel) weights. N:M: the mask of
    every group of m columns is chosen when the solve reaches it, from the already-updated weights.
    """
    if not isinstance(pattern, (Unstructured, NM)):
        raise ValueError(f"sparsegpt supports unstructured and N:M patterns, not {pattern}; use magnitude or wanda")
    rows, cols = W.shape
    Hinv = inverse_hessian_factor(H, dampening).to(W.device)
    Wf = W.detach().float().clone()
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    if isinstance(pattern, NM):
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)  # a group must not straddle two blocks
    total = rows * cols
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2].clone()  # (out, b)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        Err1 = torch.zeros_like(W1)
        d = torch.diag(Hinv1)  # (b,)
        if isinstance(pattern, Unstructured):
            k = num_pruned(rows * i2, sparsity) - num_pruned(rows * i1, sparsity)
            block_keep = prune_lowest((W1.pow(2) / d.pow(2)).T.reshape(1, -1), torch.tensor([k]))
            keep[:, i1:i2] = block_keep.reshape(i2 - i1, rows).T  # column-major flatten: ties go left first
        for i in range(i2 - i1):
            if isinstance(pattern, NM) and i % pattern.m == 0:
                g = W1[:, i : i + pattern.m].pow(2) / d[i : i + pattern.m].pow(2)  # (out, m)
                counts = torch.full((rows,), pattern.m - pattern.n, dtype=torch.long)
                keep[:, i1 + i : i1 + i + pattern.m] = prune_lowest(g, counts)
            w = W1[:, i]  # (out,)
            q = w * keep[:, i1 + i]
            err = (w - q) / Hinv1[i, i]  # (out,)
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)  # OBS update of the rest of the block
            W1[:, i] = q
            Err1[:, i] = err
        Wf[:, i1:i2] = W1
        Wf[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of all later columns
    assert isinstance(pattern, NM) or int((~keep).sum()) == num_pruned(total, sparsity)
    return (Wf * keep).to(W.dtype), keep
