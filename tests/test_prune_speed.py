"""The fast paths of the one-shot prune give the same answers as the plain ones (issue 14, item 4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsecraft.engine.hooks import LayerCollector
from sparsecraft.engine.loop import prune_layer, reconstruction_error
from sparsecraft.engine.record import PackedMasks, PruneResult
from sparsecraft.methods import get_method
from sparsecraft.methods.base import LayerStats, prune_by_score
from sparsecraft.methods.wanda import keep_above_kth, wanda_score
from sparsecraft.patterns import Unstructured, prune_lowest, split_counts


def _scores(kind: int, G: int, U: int, g: torch.Generator) -> torch.Tensor:
    if kind == 0:
        return torch.rand(G, U, generator=g)
    if kind == 1:  # heavy ties: 4 distinct values
        return torch.randint(0, 4, (G, U), generator=g).float()
    if kind == 2:  # zeros and one value
        return torch.randint(0, 2, (G, U), generator=g).float() * 0.3
    s = torch.full((G, U), 1.0)  # a plateau with a few distinct values
    s[:, ::3] = torch.randn(G, (U + 2) // 3, generator=g)
    return s


def test_keep_above_kth_equals_stable_sort_mask() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        G, U = torch.randint(1, 30, (2,), generator=g).tolist()
        s = _scores(trial % 4, G, U, g)
        counts = split_counts(G * U, G, float(torch.rand(1, generator=g)) * 0.99)  # counts may differ by one
        assert torch.equal(keep_above_kth(s, counts), prune_lowest(s, counts)), (trial, G, U)


def test_keep_above_kth_golden_ties_go_left_first() -> None:
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 2.0, 1.0], [float("-inf"), 5.0, float("inf"), 0.0]])
    keep = keep_above_kth(s, torch.tensor([2, 2, 1]))
    assert keep.tolist() == [[False, False, True, True], [True, False, True, False], [False, True, True, True]]


def test_keep_above_kth_rejects_nan() -> None:
    s = torch.rand(4, 6)
    s[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        keep_above_kth(s, torch.tensor([3, 3, 3, 3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wanda_fast_path_equals_sorted_path(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 40, generator=g).to(dtype)
    W[:, :5] = W[:, :1]  # ties within rows
    sq = torch.rand(40, generator=g)
    sq[7] = 0.0  # a dead input: ties at zero
    for sparsity in (0.3, 0.5, 0.77):
        W2, keep = get_method("wanda").prune(W, LayerStats(sqnorm=sq), sparsity, Unstructured(), g)
        W3, keep3 = prune_by_score(W, wanda_score(W, sq), sparsity, Unstructured(), "row")
        assert torch.equal(keep, keep3) and torch.equal(W2, W3) and W2.dtype == dtype


def test_reconstruction_error_matches_plain_formula() -> None:
    g = torch.Generator().manual_seed(2)
    W, W2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    X = torch.randn(50, 8, generator=g)
    H = 2 / 50 * X.T @ X
    dW = W - W2
    full = float(torch.trace(dW @ H @ dW.T) / torch.trace(W @ H @ W.T))
    diag = float((dW.pow(2) * H.diagonal()).sum() / (W.pow(2) * H.diagonal()).sum())
    assert reconstruction_error(W, W2, H) == pytest.approx(full, rel=1e-5)
    assert reconstruction_error(W, W2, H.diagonal().clone()) == pytest.approx(diag, rel=1e-5)
    assert reconstruction_error(W.bfloat16(), W2.bfloat16(), H.diagonal().clone()) == pytest.approx(
        reconstruction_error(W.bfloat16().float(), W2.bfloat16().float(), H.diagonal().clone()), rel=1e-5)


def test_prune_layer_leaves_the_old_weight_tensor_intact() -> None:
    """run_oneshot restores a failed block from the tensors it held before pruning: prune_layer must not write into
    them (it points the module at a new tensor)."""
    torch.manual_seed(3)
    layer = nn.Linear(8, 6, bias=False)
    old = layer.weight.data
    before = old.clone()
    collector = LayerCollector(layer, "l", ("sqnorm",), "cpu")
    collector.update(torch.randn(10, 8))
    keep, record = prune_layer("l", layer, collector, get_method("wanda"), 0.5, Unstructured(), 0)
    assert torch.equal(old, before)
    assert torch.equal(layer.weight.data, before * keep) and layer.weight.data.data_ptr() != old.data_ptr()
    assert record.sparsity == 0.5 and int((~keep).sum()) == 24


def test_packed_masks_round_trip_and_size() -> None:
    g = torch.Generator().manual_seed(4)
    masks = PackedMasks()
    shapes = {"a": (3, 5), "b": (7, 16), "c": (2, 3, 3)}
    ref = {k: torch.rand(*s, generator=g) > 0.4 for k, s in shapes.items()}
    for k, v in ref.items():
        masks[k] = v
    assert list(masks) == ["a", "b", "c"] and len(masks) == 3
    for k, v in ref.items():
        got = masks[k]
        assert got.dtype == torch.bool and torch.equal(got, v)
    assert masks._bits["b"][0].nbytes == 7 * 16 // 8  # one bit per weight
    masks["a"] = ~ref["a"]
    assert torch.equal(masks["a"], ~ref["a"])
    del masks["c"]
    assert set(masks) == {"a", "b"} and dict(masks).keys() == {"a", "b"}
    result = PruneResult("wanda", "unstructured", "layers")
    result.masks["x"] = torch.tensor([[True, False, False, False]])
    assert isinstance(result.masks, PackedMasks) and result.sparsity == 0.75
