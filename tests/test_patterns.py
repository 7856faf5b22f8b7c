"""Golden masks worked out by hand, exact zero counts, and pattern validation."""

import pytest
import torch

from sparsecraft.patterns import (NM, Block, Unstructured, expected_zeros, num_pruned, parse_pattern, satisfies,
                                  split_counts, topk_mask)


def test_parse_pattern():
    assert parse_pattern("2:4") == NM(2, 4)
    assert parse_pattern("4:8") == NM(4, 8)
    assert parse_pattern("unstructured") == Unstructured()
    assert parse_pattern("4x1") == Block(4, 1)
    assert str(NM(2, 4)) == "2:4" and str(Block(8, 8)) == "8x8"


@pytest.mark.parametrize("bad", ["5:4", "0:4", "2:0", "abc", "2-4", "0x4"])
def test_parse_pattern_rejects_bad(bad):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(bad)


def test_nm_golden_with_ties():
    score = torch.tensor([[3.0, 1, 4, 1, 5, 9, 2, 6],
                          [1.0, 1, 1, 1, 2, 2, 2, 2]])  # all-equal groups: lower index pruned first
    keep = topk_mask(score, None, "2:4")
    assert keep.int().tolist() == [[1, 0, 1, 0, 0, 1, 0, 1],
                                   [0, 0, 1, 1, 0, 0, 1, 1]]


def test_unstructured_row_golden():
    score = torch.tensor([[3.0, 1, 4, 1, 5, 9, 2, 6]])
    assert topk_mask(score, 0.5).int().tolist() == [[0, 0, 1, 0, 1, 1, 0, 1]]
    # 0.25 of 8 = 2 pruned: the two 1s (indices 1 and 3)
    assert topk_mask(score, 0.25).int().tolist() == [[1, 0, 1, 0, 1, 1, 1, 1]]


def test_unstructured_tensor_scope_ties_prune_lowest_flat_index():
    score = torch.ones(2, 4)
    keep = topk_mask(score, 0.25, "unstructured", scope="tensor")
    assert keep.int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_row_counts_split_exactly_when_not_integer():
    # 3 rows x 5 cols at 0.5: 7.5 -> 8 zeros overall, rows get 3, 2, 3 by cumulative rounding (2.5->3, 5, 7.5->8)
    assert split_counts(15, 3, 0.5).tolist() == [3, 2, 3]
    keep = topk_mask(torch.arange(15.0).reshape(3, 5), 0.5)
    assert (~keep).sum(1).tolist() == [3, 2, 3]
    assert int((~keep).sum()) == num_pruned(15, 0.5) == 8


def test_block_golden():
    score = torch.arange(16.0).reshape(4, 4)
    keep = topk_mask(score, 0.5, "2x2")  # tile sums [[10, 18], [42, 50]]: each block-row drops its left tile
    assert keep.int().tolist() == [[0, 0, 1, 1]] * 4
    keep_t = topk_mask(score, 0.5, "2x2", scope="tensor")  # the two smallest tiles are the top ones
    assert keep_t.int().tolist() == [[0, 0, 0, 0]] * 2 + [[1, 1, 1, 1]] * 2


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("unstructured", 0.33),
                                              ("2:4", None), ("4:8", None), ("1:4", None), ("4x4", 0.5),
                                              ("1x4", 0.6), ("4x1", 0.3), ("8x8", 0.5)])
@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_exact_zero_counts(pattern, sparsity, scope):
    torch.manual_seed(0)
    score = torch.randn(24, 64).abs()
    keep = topk_mask(score, sparsity, pattern, scope)
    assert keep.dtype == torch.bool
    assert int((~keep).sum()) == expected_zeros((24, 64), sparsity, pattern)
    assert satisfies(keep, pattern)
    p = parse_pattern(pattern)
    if isinstance(p, NM):  # exactly m - n zeros in every group
        assert ((~keep).reshape(-1, p.m).sum(1) == p.m - p.n).all()


def test_all_equal_scores_and_pure():
    score = torch.zeros(4, 8)
    before = score.clone()
    keep = topk_mask(score, 0.5)
    assert torch.equal(score, before)
    assert keep.int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]] * 4


@pytest.mark.parametrize("sparsity", [1.0, 1.2, -0.1, float("nan")])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        topk_mask(torch.ones(2, 4), sparsity)


def test_nm_width_must_divide():
    with pytest.raises(ValueError, match="multiple of m=4"):
        topk_mask(torch.ones(2, 6), None, "2:4")


def test_nm_conflicting_sparsity():
    with pytest.raises(ValueError, match="fixes the sparsity"):
        topk_mask(torch.ones(2, 8), 0.7, "2:4")


def test_nan_scores_rejected():
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(torch.tensor([[1.0, float("nan")]]), 0.5)
