"""ADMM weight update (Boza 2024): closed-form diagonal case, never worse than its start, exact counts."""

import pytest
import torch
from torch.testing import assert_close

from sparsecraft.methods import get_method
from sparsecraft.methods.base import LayerStats
from sparsecraft.patterns import NM, Unstructured, expected_zeros, satisfies
from sparsecraft.solvers.admm import admm_gradual, layer_objective


def random_problem(out=16, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, cols, generator=g) * torch.rand(cols, generator=g) * 3
    X[:, :4] += X[:, 4:8]  # correlated inputs: weight updates matter
    H = 2 / 400 * X.T @ X
    return torch.randn(out, cols, generator=g), LayerStats(sqnorm=torch.diag(H) / 2, hessian=H)


def test_diagonal_hessian_closed_form():
    # diagonal H: no compensation is possible, the optimum keeps the largest |w| sqrt(h) and leaves them unchanged
    W = torch.tensor([[3.0, -1.0, 2.0, 0.5]])
    H = torch.diag(torch.tensor([1.0, 16.0, 1.0, 4.0]))  # |w| sqrt(h) = 3, 4, 2, 1
    V, keep = admm_gradual(W, H, 0.5, Unstructured(), dampening=0.0)
    assert torch.equal(keep, torch.tensor([[True, True, False, False]]))
    assert_close(V, torch.tensor([[3.0, -1.0, 0.0, 0.0]]), atol=1e-4, rtol=0)
    assert layer_objective(W, V, H) == pytest.approx(2.0**2 * 1 + 0.5**2 * 4, abs=1e-3)  # = 5


@pytest.mark.parametrize("pattern,sparsity", [(Unstructured(), 0.5), (Unstructured(), 0.7), (NM(2, 4), 0.5)])
@pytest.mark.parametrize("base", ["wanda", "sparsegpt"])
def test_never_worse_than_the_start_and_exact(pattern, sparsity, base):
    W, stats = random_problem()
    g = torch.Generator()
    V0, _ = get_method(base).prune(W, stats, sparsity, pattern, g)
    for gradual in (True, False):
        V, keep = get_method("admm", base=base, gradual=gradual).prune(W, stats, sparsity, pattern, g)
        assert layer_objective(W, V, stats.hessian) <= layer_objective(W, V0, stats.hessian)
        assert int((~keep).sum()) == expected_zeros(tuple(W.shape), sparsity, pattern)
        assert satisfies(keep, pattern) and (V[~keep] == 0).all()


def test_admm_beats_wanda_on_correlated_inputs():
    W, stats = random_problem(seed=1)
    g = torch.Generator()
    V0, _ = get_method("wanda").prune(W, stats, 0.5, Unstructured(), g)
    V, _ = get_method("admm").prune(W, stats, 0.5, Unstructured(), g)
    assert layer_objective(W, V, stats.hessian) < 0.9 * layer_objective(W, V0, stats.hessian)


def test_bad_options():
    with pytest.raises(ValueError, match="mask_iters"):
        get_method("admm", iters=5, mask_iters=10)
    with pytest.raises(ValueError, match="plain method"):
        get_method("admm", base="alps")
    with pytest.raises(ValueError, match="valid methods"):
        get_method("admm", base="nope")
