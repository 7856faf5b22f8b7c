"""Packed formats: bit-exact round trips through tensors() and safetensors, sizes, and input errors."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsecraft.formats import from_tensors, pack
from sparsecraft.formats.bits import pack_bits, pack_uints, unpack_bits, unpack_uints
from sparsecraft.patterns import NM, Block, Unstructured, topk_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(dtype)


def _mask(w: torch.Tensor, pattern, sparsity=None) -> torch.Tensor:
    keep = topk_mask(w.float().abs(), sparsity, pattern)
    keep[0] = True  # an all-kept row
    if isinstance(pattern, Block):
        keep[: pattern.rows] = True
        keep[-pattern.rows :] = False  # an all-pruned block row
    elif isinstance(pattern, Unstructured):
        keep[-1] = False  # an all-pruned row
    return keep if not isinstance(pattern, NM) else _nm_fix(keep, pattern)


def _nm_fix(keep: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Row 0 all kept is not N:M; make row 0 exactly n per group and row -1 fully pruned (underfull groups)."""
    keep = keep.clone()
    keep[0] = False
    keep[0].view(-1, pattern.m)[:, : pattern.n] = True
    keep[-1] = False
    return keep


def _check_roundtrip(w: torch.Tensor, keep: torch.Tensor, pattern, tmp_path) -> None:
    packed = pack(w, keep, pattern)
    expected = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
    assert packed.to_dense().dtype == w.dtype
    assert torch.equal(packed.to_dense(), expected)
    assert torch.equal(packed.keep(), keep)
    again = from_tensors(packed.tensors())
    assert torch.equal(again.to_dense(), expected) and torch.equal(again.keep(), keep)
    save_file(packed.tensors(), str(tmp_path / "p.safetensors"))
    loaded = from_tensors(load_file(str(tmp_path / "p.safetensors")))
    assert torch.equal(loaded.to_dense(), expected) and torch.equal(loaded.keep(), keep)
    assert loaded.nbytes == packed.nbytes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (16, 64), (33, 100)])
def test_unstructured_roundtrip(dtype, shape, tmp_path):
    w = _weight(*shape, dtype)
    _check_roundtrip(w, _mask(w, Unstructured(), 0.6), Unstructured(), tmp_path)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern,shape", [(NM(2, 4), (5, 12)), (NM(4, 8), (9, 40)), (NM(1, 3), (4, 9)), (NM(3, 16), (6, 48))])
def test_nm_roundtrip(dtype, pattern, shape, tmp_path):
    w = _weight(*shape, dtype)
    _check_roundtrip(w, _mask(w, pattern), pattern, tmp_path)


def test_nm_full_groups_have_no_slot_mask():
    w = _weight(8, 16, torch.float32)
    packed = pack(w, topk_mask(w.abs(), None, "2:4"), NM(2, 4))
    assert "slot_keep" not in packed.tensors()
    assert packed.values.shape == (8, 8) and packed.index.numel() == 8 * 4 * 4 // 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern,shape", [(Block(2, 4), (6, 20)), (Block(4, 4), (16, 16)), (Block(1, 8), (3, 72))])
def test_block_roundtrip(dtype, pattern, shape, tmp_path):
    w = _weight(*shape, dtype)
    _check_roundtrip(w, _mask(w, pattern, 0.5), pattern, tmp_path)


def test_all_pruned_and_all_kept_tensors(tmp_path):
    w = _weight(4, 10, torch.float32)
    _check_roundtrip(w, torch.zeros(4, 10, dtype=torch.bool), Unstructured(), tmp_path)
    _check_roundtrip(w, torch.ones(4, 10, dtype=torch.bool), Unstructured(), tmp_path)


def test_keeps_exact_bits_of_special_values(tmp_path):
    w = torch.tensor([[-0.0, float("inf"), 1e-45, float("nan")], [3.0, -float("inf"), 0.0, 2.0]])
    keep = torch.tensor([[True, True, True, False], [True, True, True, False]])
    packed = from_tensors(pack(w, keep, NM(3, 4)).tensors())
    dense = packed.to_dense()
    assert torch.equal(dense.view(torch.int32), torch.where(keep, w, 0.0).view(torch.int32))


def test_fifty_percent_fp32_takes_53_percent_of_dense():
    w = _weight(256, 512, torch.float32)
    for pattern, sparsity in [(Unstructured(), 0.5), (NM(2, 4), None)]:
        packed = pack(w, topk_mask(w.abs(), sparsity, pattern), pattern)
        ratio = packed.nbytes / (w.numel() * 4)
        assert 0.53 <= ratio < 0.532, (pattern, ratio)
    packed = pack(w.bfloat16(), topk_mask(w.abs(), 0.5, Unstructured()), Unstructured())
    assert 0.56 <= packed.nbytes / (w.numel() * 2) < 0.563


def test_bit_helpers_roundtrip():
    bits = torch.rand(3, 19) > 0.5
    assert torch.equal(unpack_bits(pack_bits(bits), 19), bits)
    assert pack_bits(torch.tensor([True, False, True, True, False, False, False, False, True])).tolist() == [13, 1]
    vals = torch.randint(0, 8, (37,))
    assert torch.equal(unpack_uints(pack_uints(vals, 3), 37, 3), vals)


def test_errors_say_how_to_fix():
    w = _weight(4, 8, torch.float32)
    with pytest.raises(ValueError, match="more than 2"):
        pack(w, torch.ones(4, 8, dtype=torch.bool), NM(2, 4))
    with pytest.raises(ValueError, match="torch.bool"):
        pack(w, torch.ones(4, 8), Unstructured())
    with pytest.raises(ValueError, match="partly kept"):
        keep = torch.ones(4, 8, dtype=torch.bool)
        keep[0, 0] = False
        pack(w, keep, Block(2, 2))
    with pytest.raises(ValueError, match="multiple of m"):
        pack(_weight(4, 6, torch.float32), torch.ones(4, 6, dtype=torch.bool), NM(2, 4))
    with pytest.raises(ValueError, match="format"):
        from_tensors({"values": w})
