"""Methods on hand-computed one-layer cases; reconstruction-error ordering; purity; registry errors."""

import pytest
import torch

from sparsecraft.engine.loop import reconstruction_error
from sparsecraft.methods import METHODS, get_method, register_method
from sparsecraft.methods.base import LayerStats
from sparsecraft.patterns import NM, Unstructured, parse_pattern
from sparsecraft.solvers.obs import sparsegpt_solve
from sparsecraft.stats import Hessian, InputSqNorm


def stats_of(X: torch.Tensor) -> LayerStats:
    q, h = InputSqNorm(X.shape[1]), Hessian(X.shape[1])
    q.update(X)
    h.update(X)
    return LayerStats(q.value, h.value)


def test_stats_golden_and_batch_invariant():
    X = torch.tensor([[2.0, 0, 1, 0], [0, 0, 1, 1]])
    st = stats_of(X)
    assert st.sqnorm.tolist() == [2.0, 0.0, 1.0, 0.5]
    assert torch.allclose(st.hessian, X.T @ X)  # 2/N with N = 2
    h = Hessian(4)
    h.update(X[:1])
    h.update(X[1:])
    assert torch.allclose(h.value, st.hessian)


def test_wanda_hand_computed():
    # mean x^2 = [2, 0, 1, 0.5] -> norms [1.414, 0, 1, 0.707]
    X = torch.tensor([[2.0, 0, 1, 0], [0, 0, 1, 1]])
    W = torch.tensor([[4.0, 3, 2, 1], [1, 1, 1, 1]])
    # scores row 0: [5.66, 0, 2, 0.71] -> keep 0 and 2; row 1: [1.41, 0, 1, 0.71] -> keep 0 and 2
    W2, keep = get_method("wanda").prune(W, stats_of(X), 0.5, Unstructured(), torch.Generator())
    assert keep.int().tolist() == [[1, 0, 1, 0], [1, 0, 1, 0]]
    assert W2.tolist() == [[4.0, 0, 2, 0], [1, 0, 1, 0]]
    _, keep_mag = get_method("magnitude").prune(W, stats_of(X), 0.5, Unstructured(), torch.Generator())
    # magnitude ignores the inputs and compares across the layer: the four 1s go (ties: lower flat index first)
    assert keep_mag.int().tolist() == [[1, 1, 1, 0], [0, 0, 0, 1]]


def test_sparsegpt_diagonal_hessian_is_obs_score():
    # With a diagonal H and no dampening, no column update couples columns: the mask is w^2 * h_ii over the block
    # and kept weights are unchanged.
    W = torch.tensor([[1.0, 2, 3, 4], [4, 3, 2, 1]])
    H = torch.diag(torch.tensor([16.0, 1, 1, 0.25]))
    W2, keep = sparsegpt_solve(W, H, 0.5, Unstructured(), blocksize=4, dampening=0.0)
    # scores w^2 h: row 0 [16, 4, 9, 4], row 1 [256, 9, 4, 0.25]; prune the 4 lowest: 0.25, 4 (r0c1), 4 (r0c3)
    # then 4 (r1c2) -> ties broken by lower column-major index first
    assert keep.int().tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]
    assert torch.equal(W2, W * keep)


def test_sparsegpt_reconstructs_better_than_masking():
    torch.manual_seed(0)
    X = torch.randn(512, 32) @ torch.randn(32, 32)  # correlated inputs: the OBS update helps
    W = torch.randn(16, 32)
    st = stats_of(X)
    W2, keep = sparsegpt_solve(W, st.hessian, 0.5, Unstructured(), dampening=0.01)
    assert reconstruction_error(W, W2, st.hessian) < reconstruction_error(W, W * keep, st.hessian)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ("unstructured", 0.7)])
def test_error_ordering_sparsegpt_wanda_magnitude(pattern, sparsity):
    torch.manual_seed(0)
    X = torch.randn(2048, 64) * (torch.rand(64) * 3)  # features of very different scales
    W = torch.randn(32, 64)
    st = stats_of(X)
    p = parse_pattern(pattern)
    s = sparsity if sparsity is not None else p.sparsity
    err = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        W2, _ = get_method(name).prune(W, st, s, p, torch.Generator())
        err[name] = reconstruction_error(W, W2, st.hessian)
    assert err["sparsegpt"] <= err["wanda"] <= err["magnitude"], err


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_methods_are_pure_and_seeded(name, pattern):
    torch.manual_seed(0)
    X, W = torch.randn(64, 16), torch.randn(8, 16)
    st = stats_of(X)
    before = (W.clone(), st.sqnorm.clone(), st.hessian.clone())
    p = parse_pattern(pattern)
    s = 0.5
    a = get_method(name).prune(W, st, s, p, torch.Generator().manual_seed(3))
    b = get_method(name).prune(W, st, s, p, torch.Generator().manual_seed(3))
    assert torch.equal(W, before[0]) and torch.equal(st.sqnorm, before[1]) and torch.equal(st.hessian, before[2])
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_random_depends_on_seed():
    W = torch.randn(8, 16)
    k1 = get_method("random").prune(W, LayerStats(), 0.5, Unstructured(), torch.Generator().manual_seed(1))[1]
    k2 = get_method("random").prune(W, LayerStats(), 0.5, Unstructured(), torch.Generator().manual_seed(2))[1]
    assert not torch.equal(k1, k2)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="valid methods: ") as info:
        get_method("obs")
    listed = str(info.value).split("valid methods: ")[1].split(", ")
    assert listed == sorted(METHODS) and {"magnitude", "random", "wanda", "sparsegpt"} <= set(listed)


def test_register_method_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_method("wanda", object)


def test_cholesky_failure_suggests_dampening():
    with pytest.raises(ValueError, match="raise the dampening"):
        sparsegpt_solve(torch.randn(4, 4), -torch.eye(4), 0.5, Unstructured(), dampening=0.0)


def test_sparsegpt_rejects_blocks():
    with pytest.raises(ValueError, match="unstructured and N:M"):
        get_method("sparsegpt").prune(torch.randn(4, 4), LayerStats(hessian=torch.eye(4)), 0.5,
                                      parse_pattern("2x2"), torch.Generator())


def test_sparsegpt_nm_keeps_pattern():
    torch.manual_seed(1)
    X, W = torch.randn(256, 24), torch.randn(6, 24)
    W2, keep = sparsegpt_solve(W, stats_of(X).hessian, 0.5, NM(2, 4), blocksize=10)  # block rounds to 8
    assert ((keep.reshape(-1, 4).sum(1)) == 2).all()
    assert (W2[~keep] == 0).all() and torch.isfinite(W2).all()
