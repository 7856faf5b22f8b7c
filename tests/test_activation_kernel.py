"""The activation-sparse GEMV: AVX2 kernel vs plain-torch reference, and the reference vs masked dense by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsecraft.kernels.colsparse import colsparse_linear, colsparse_linear_ref, load_colsparse, transpose_weight

SHAPES = [(1, 1), (7, 3), (8, 8), (33, 17), (576, 1536), (1536, 576), (300, 1001)]  # (out, in): tails of 8 and 4


def _case(out: int, inp: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g).to(dtype)
    x = torch.randn(inp, generator=g)
    return w, x, torch.rand(inp, generator=g) + 0.5, torch.randn(out, generator=g)


def test_reference_matches_hand_masked_dense() -> None:
    w, x, scale, bias = _case(33, 17, torch.float32)
    keep = x.abs() * scale > 0.7
    want = F.linear(torch.where(keep, x, 0.0), w, bias)
    torch.testing.assert_close(colsparse_linear_ref(transpose_weight(w), x, scale, 0.7, bias), want)


@pytest.mark.parametrize("out,inp", SHAPES)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.0, 0.67, 1.5])
def test_kernel_matches_reference(out: int, inp: int, wdtype: torch.dtype, threshold: float) -> None:
    if load_colsparse() is None:
        pytest.skip("the AVX2 extension cannot be built on this machine (the reference is tested above)")
    w, x, scale, bias = _case(out, inp, wdtype)
    wt = transpose_weight(w)
    for s, b in ((None, None), (scale, bias)):
        got = colsparse_linear(wt, x, s, threshold, b)
        want = colsparse_linear_ref(wt, x, s, threshold, b)
        assert got.shape == (out,) and got.dtype == x.dtype
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * inp**0.5)


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
def test_kernel_keeps_activation_dtype_and_batch_shape(xdtype: torch.dtype) -> None:
    if load_colsparse() is None:
        pytest.skip("the AVX2 extension cannot be built on this machine (the reference is tested above)")
    w, x, _, _ = _case(64, 48, torch.bfloat16)
    wt = transpose_weight(w)
    x = x.to(xdtype).reshape(1, 1, 48)
    got = colsparse_linear(wt, x, None, 0.5)
    assert got.shape == (1, 1, 64) and got.dtype == xdtype
    torch.testing.assert_close(got, colsparse_linear_ref(wt, x, None, 0.5), rtol=1e-2, atol=1e-2)


def test_many_tokens_use_the_reference_path() -> None:
    w, _, scale, bias = _case(40, 24, torch.float32)
    x = torch.randn(3, 5, 24)
    wt = transpose_weight(w)
    torch.testing.assert_close(colsparse_linear(wt, x, scale, 0.3, bias), colsparse_linear_ref(wt, x, scale, 0.3, bias))


def test_everything_skipped_gives_bias_only() -> None:
    if load_colsparse() is None:
        pytest.skip("the AVX2 extension cannot be built on this machine (the reference is tested above)")
    w, x, _, bias = _case(19, 11, torch.float32)
    assert torch.equal(colsparse_linear(transpose_weight(w), x, None, 1e9, bias), bias)


def test_kernel_split_over_threads_matches_reference() -> None:
    if load_colsparse() is None:
        pytest.skip("the AVX2 extension cannot be built on this machine (the reference is tested above)")
    w, x, scale, bias = _case(4100, 2048, torch.float32, seed=2)  # >= 2^21 kept weights per thread
    wt = transpose_weight(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the kernel splits the kept inputs over 2 threads and adds the partials
        got = colsparse_linear(wt, x, scale, 0.5, bias)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, colsparse_linear_ref(wt, x, scale, 0.5, bias), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("out,inp", SHAPES)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wsparsity", [0.0, 0.5, 0.9])
def test_pruned_kernel_matches_reference(out: int, inp: int, wdtype: torch.dtype, wsparsity: float) -> None:
    """Weight + activation sparsity: the bitmask-packed W.T kernel against masked dense by reference."""
    if load_colsparse() is None:
        pytest.skip("the AVX2 extension cannot be built on this machine (the reference is tested above)")
    from sparsecraft.kernels.colsparse import colsparse_bitmask_linear, transposed_bitmask
    from sparsecraft.patterns import topk_mask

    w, x, scale, bias = _case(out, inp, wdtype, seed=1)
    keep = topk_mask(w.float().abs(), wsparsity, "unstructured")
    w = torch.where(keep, w, torch.zeros((), dtype=wdtype))
    layout_t = transposed_bitmask(w, keep)
    for s, b, threshold in ((None, None, 0.0), (scale, bias, 0.67), (scale, None, 1e9)):
        got = colsparse_bitmask_linear(layout_t, x, s, threshold, b)
        want = colsparse_linear_ref(transpose_weight(w), x, s, threshold, b)
        assert got.shape == (out,) and got.dtype == x.dtype
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * inp**0.5)
        plain = colsparse_bitmask_linear(layout_t, x, s, threshold, b, use_kernel=False)
        torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5 * inp**0.5)
