"""ALPS-style ADMM + PCG: diagonal closed form, PCG = exact least squares on the support, never worse."""

import pytest
import torch
from torch.testing import assert_close

from sparsecraft.methods import get_method
from sparsecraft.methods.base import LayerStats
from sparsecraft.patterns import NM, Unstructured, expected_zeros, satisfies
from sparsecraft.solvers.admm import layer_objective
from sparsecraft.solvers.alps import alps_solve, rho_factor
from sparsecraft.solvers.cg import pcg_on_support
from test_admm import random_problem


def test_diagonal_hessian_closed_form():
    W = torch.tensor([[3.0, -1.0, 2.0, 0.5], [1.0, 1.0, -4.0, 0.0]])
    H = torch.diag(torch.tensor([1.0, 16.0, 1.0, 4.0]))
    start = torch.tensor([[False, False, True, True], [True, True, False, False]])  # a bad start on purpose
    V, keep = alps_solve(W, H, start, 0.5, Unstructured(), dampening=0.0)
    # row 0: |w| sqrt(h) = 3, 4, 2, 1 -> keep 0, 1; row 1: 1, 4, 4, 0 -> keep 1, 2
    assert torch.equal(keep, torch.tensor([[True, True, False, False], [False, True, True, False]]))
    assert_close(V, W * keep, atol=1e-5, rtol=0)


def test_pcg_matches_exact_least_squares_on_the_support():
    W, stats = random_problem(out=4, cols=12)
    H = stats.hessian.double()
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(4, 12, generator=g) > 0.5
    V = pcg_on_support(W, stats.hessian, keep, torch.zeros(4, 12), iters=100, tol=1e-10)
    for i in range(4):  # H_SS v_S = (H w_i)_S
        S = keep[i]
        exact = torch.linalg.solve(H[S][:, S], (H @ W[i].double())[S])
        assert_close(V[i, S].double(), exact, atol=1e-3, rtol=1e-3)
        assert (V[i, ~S] == 0).all()


@pytest.mark.parametrize("pattern,sparsity", [(Unstructured(), 0.5), (Unstructured(), 0.7), (NM(2, 4), 0.5)])
def test_never_worse_than_wanda_and_sparsegpt_start(pattern, sparsity):
    W, stats = random_problem()
    g = torch.Generator()
    for base in ("wanda", "sparsegpt"):
        V0, _ = get_method(base).prune(W, stats, sparsity, pattern, g)
        V, keep = get_method("alps", base=base).prune(W, stats, sparsity, pattern, g)
        assert layer_objective(W, V, stats.hessian) <= layer_objective(W, V0, stats.hessian)
        assert int((~keep).sum()) == expected_zeros(tuple(W.shape), sparsity, pattern)
        assert satisfies(keep, pattern) and (V[~keep] == 0).all()


def test_rho_schedule():
    assert rho_factor(100, 1000) == 1.3 and rho_factor(5, 1000) == 1.2 and rho_factor(1, 1000) == 1.1
    assert rho_factor(0, 1000) == 1.1
