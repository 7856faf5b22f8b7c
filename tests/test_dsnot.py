"""DSnoT refinement: never raises a layer's reconstruction error, keeps sparsity and pattern exact."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from sparsecraft.api import prune
from sparsecraft.engine.loop import reconstruction_error
from sparsecraft.methods import LayerStats, get_method
from sparsecraft.patterns import num_pruned, parse_pattern, satisfies
from sparsecraft.solvers.dsnot import dsnot_refine, row_errors


def correlated_layer(seed: int = 0, rows: int = 24, cols: int = 32) -> tuple[torch.Tensor, LayerStats]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, cols, generator=g) @ torch.randn(cols, cols, generator=g)  # correlated inputs
    X[:, 3] = 0.0  # a dead input feature
    W = torch.randn(rows, cols, generator=g)
    return W, LayerStats(sqnorm=X.pow(2).mean(0), hessian=2 * X.T @ X / X.shape[0])


@pytest.mark.parametrize("base", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("unstructured", 0.3), ("2:4", None),
                                              ("1:4", None)])
def test_refinement_lowers_every_row_error_and_keeps_counts_and_pattern(base, pattern, sparsity):
    W, stats = correlated_layer()
    p = parse_pattern(pattern)
    s = p.sparsity if sparsity is None else sparsity
    g = torch.Generator().manual_seed(0)
    w0, k0 = get_method(base).prune(W, stats, s, p, g)
    w1, k1 = get_method(f"{base}+dsnot").prune(W, stats, s, p, torch.Generator().manual_seed(0))
    assert torch.equal(k0.sum(1), k1.sum(1))  # per-row counts, hence the layer's sparsity, unchanged
    assert int((~k1).sum()) == (num_pruned(W.numel(), s) if sparsity else W.numel() * (p.m - p.n) // p.m)
    assert satisfies(k1, p) and torch.equal(w1 != 0, k1 & (w1 != 0)) and bool((w1[~k1] == 0).all())
    e0, e1 = row_errors(W, w0, stats.hessian), row_errors(W, w1, stats.hessian)
    assert bool((e1 <= e0).all())
    assert reconstruction_error(W, w1, stats.hessian) < reconstruction_error(W, w0, stats.hessian)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("2:4", None)])
def test_damped_swaps_still_never_raise_the_undamped_error(pattern, sparsity):
    W, stats = correlated_layer(2, cols=64)
    X = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))  # 16 tokens for 64 inputs: H is rank-deficient
    stats = LayerStats(sqnorm=X.pow(2).mean(0), hessian=2 * X.T @ X / 16)
    p = parse_pattern(pattern)
    s = p.sparsity if sparsity is None else sparsity
    w0, k0 = get_method("sparsegpt").prune(W, stats, s, p, torch.Generator())
    plain = dsnot_refine(W, w0, k0, stats.hessian, p)
    damped = dsnot_refine(W, w0, k0, stats.hessian, p, dampening=0.1)
    e0 = row_errors(W, w0, stats.hessian)
    for w1, k1 in (plain, damped):
        assert bool((row_errors(W, w1, stats.hessian) <= e0).all()) and satisfies(k1, p)
        assert torch.equal(k1.sum(1), k0.sum(1))
    assert not torch.equal(plain[0], damped[0])  # the ridge changes the grown values
    with pytest.raises(ValueError, match="dampening"):
        dsnot_refine(W, w0, k0, stats.hessian, p, dampening=-1.0)


def test_zero_iterations_change_nothing_and_the_input_is_not_mutated():
    W, stats = correlated_layer(1)
    w0, k0 = get_method("wanda").prune(W, stats, 0.5, parse_pattern("unstructured"), torch.Generator())
    W_copy, w0_copy, k0_copy = W.clone(), w0.clone(), k0.clone()
    w1, k1 = dsnot_refine(W, w0, k0, stats.hessian, parse_pattern("unstructured"), max_iter=0)
    assert torch.equal(w1, w0) and torch.equal(k1, k0)
    dsnot_refine(W, w0, k0, stats.hessian, parse_pattern("unstructured"))
    assert torch.equal(W, W_copy) and torch.equal(w0, w0_copy) and torch.equal(k0, k0_copy)


def test_one_swap_by_hand():
    # H = I: the row error is the squared norm of the pruned part, so the best swap keeps the largest weights.
    W = torch.tensor([[3.0, 1.0, 2.0, 0.5]])
    keep = torch.tensor([[False, True, True, False]])  # a bad mask: 3.0 pruned, 1.0 kept
    V, K = dsnot_refine(W, W * keep, keep, torch.eye(4), parse_pattern("unstructured"))
    assert K.tolist() == [[True, False, True, False]]
    assert torch.allclose(V, torch.tensor([[3.0, 0.0, 2.0, 0.0]]))


def test_engine_with_dsnot_lowers_the_recorded_error_of_every_layer(calib):
    errs = {}
    for method in ("wanda", "wanda+dsnot"):
        model = tiny_model("llama")
        result = prune(model, method, 0.6, "unstructured", calib, progress=False)
        errs[method] = {k: v.error for k, v in result.layers.items()}
        assert result.sparsity == sum(num_pruned(m.numel(), 0.6) for m in result.masks.values()) / sum(
            m.numel() for m in result.masks.values())
    first = "model.layers.0.self_attn.q_proj"  # block 0 sees identical inputs in both runs
    assert errs["wanda+dsnot"][first] <= errs["wanda"][first]
    assert sum(errs["wanda+dsnot"].values()) < sum(errs["wanda"].values())


def test_bad_options_say_how_to_fix():
    with pytest.raises(ValueError, match="plain method"):
        get_method("dsnot", base="wanda+dsnot")
    with pytest.raises(ValueError, match="unknown method"):
        get_method("dsnot", base="nope")
    with pytest.raises(ValueError, match="block"):
        W, stats = correlated_layer()
        get_method("wanda+dsnot").prune(W, stats, 0.5, parse_pattern("2x2"), torch.Generator())
