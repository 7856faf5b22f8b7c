"""Training-free prune-and-grow refinement of a mask, in the spirit of DSnoT (Zhang et al. 2023, arXiv:2310.08915).

DSnoT swaps pruned and kept weights inside each output row to shrink the layer's reconstruction error, with no
backprop. The paper drives the swaps with the expected error (input mean) and a variance-aware pruning score; here
the swaps are driven by the EXACT layer-wise objective the engine already reports, the row error

    e_i = d_i^T H d_i,   d_i = W_i - V_i   (dense row minus current sparse row),   H = 2/N X^T X,

so every accepted swap provably lowers it. With g = H d (one row of G = D H):
- grow p (pruned): give it the least-squares value delta = g_p / H_pp; the error drops by g_p^2 / H_pp;
- then prune q (kept, q != p, same N:M group as p): V_q -> 0 raises the error by 2 V_q g'_q + V_q^2 H_qq, with
  g' = g - delta H[:, p].
Each row tries its ``candidates`` best grows p, each with its best partner q, and takes the best pair only if the
sum is negative; rows that cannot improve stop. ``dampening`` > 0 drives the swaps with H + dampening * mean(diag H) I
(ridge-regularised grown values, for few calibration tokens where H is rank-deficient); the final guard still uses
the undamped H.
Counts per row (hence unstructured sparsity) and N:M groups are preserved exactly. A final float64 check reverts
any row whose error would not have dropped (rounding), so the refinement never raises a row's error.
"""

from __future__ import annotations

import torch

from sparsecraft.patterns import NM, Pattern, Unstructured


def row_errors(W: torch.Tensor, V: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(out,) float64 d_i^T H d_i with d = W - V."""
    D = (W.double() - V.double())  # (out, in)
    return ((D @ H.double()) * D).sum(1)


def dsnot_refine(W: torch.Tensor, V: torch.Tensor, keep: torch.Tensor, H: torch.Tensor, pattern: Pattern,
                 max_iter: int = 50, candidates: int = 1, dampening: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """W dense (out, in); V current sparse weights (out, in), zero where ~keep; H (in, in) -> (V', keep'). Pure."""
    if not isinstance(pattern, (Unstructured, NM)):
        raise ValueError(f"dsnot refines unstructured and N:M masks, not {pattern}; use it without block patterns")
    if max_iter < 0 or candidates < 1 or not dampening >= 0:
        raise ValueError(f"dsnot needs max_iter >= 0, candidates >= 1, dampening >= 0; got {max_iter}, {candidates}, "
                         f"{dampening}")
    rows, cols = W.shape
    H_raw = H.detach().float().to(W.device)
    Hf = H_raw
    if dampening > 0:
        Hf = H_raw + dampening * float(torch.diag(H_raw).mean()) * torch.eye(cols, device=W.device)
    h = torch.diag(Hf).clamp_min(1e-12 * float(torch.diag(Hf).mean().clamp_min(1e-30)))  # (in,) dead inputs: no gain
    Wf, V0 = W.detach().float(), (V.detach().float() * keep)
    Vf, K = V0.clone(), keep.clone()
    G = (Wf - Vf) @ Hf  # (out, in)
    r = torch.arange(rows, device=W.device)
    col = torch.arange(cols, device=W.device)
    active = torch.ones(rows, dtype=torch.bool, device=W.device)
    inf = float("inf")
    group = col // pattern.m if isinstance(pattern, NM) else None  # (in,) N:M group of every column
    for _ in range(max_iter):
        rows_now = r[active]  # rows that can still improve
        if rows_now.numel() == 0:
            break
        Ga, Va, Ka = G[rows_now], Vf[rows_now], K[rows_now]  # (a, in)
        gain = (Ga.pow(2) / h).masked_fill_(Ka, -1.0)  # error drop of growing each pruned weight
        ra = torch.arange(rows_now.numel(), device=W.device)
        best_change = torch.full((ra.numel(),), inf, device=W.device)
        best = (None, None, None, None)
        for p in gain.topk(min(candidates, cols), dim=1).indices.T:  # p: (a,), the j-th best grow of each row
            delta = Ga[ra, p] / h[p]  # least-squares value of the grown weight
            G2 = Ga - delta.unsqueeze(1) * Hf[p]  # (a, in) g after growing p
            cost = (2 * G2 + Va * h).mul_(Va)  # error rise of pruning each weight: 2 v g' + v^2 h
            blocked = ~Ka
            blocked[ra, p] = True
            if group is not None:
                blocked |= group.unsqueeze(0) != group[p].unsqueeze(1)
            q = cost.masked_fill_(blocked, inf).argmin(1)
            change = torch.where(gain[ra, p] > 0, cost[ra, q] - gain[ra, p], inf)  # (a,)
            better = change < best_change
            best_change = torch.where(better, change, best_change)
            best = tuple(c if b is None else torch.where(better.view(-1, *[1] * (c.ndim - 1)), c, b)
                         for c, b in zip((p, q, delta, G2), best))
        p, q, delta, G2 = best
        take = best_change < 0
        active[rows_now[~take]] = False
        if not take.any():
            break
        t, pt, qt = rows_now[take], p[take], q[take]
        vq = Vf[t, qt]
        G[t] = G2[take] + vq.unsqueeze(1) * Hf[qt]  # g after pruning q
        Vf[t, pt] = delta[take]
        Vf[t, qt] = 0.0
        K[t, pt] = True
        K[t, qt] = False
    worse = row_errors(Wf, Vf, H_raw) >= row_errors(Wf, V0, H_raw)  # float64 guard: keep a row's input if no real gain
    changed = (K != keep).any(1)
    revert = worse & changed
    Vf[revert], K[revert] = V0[revert], keep[revert]
    return Vf.to(W.dtype) * K, K
