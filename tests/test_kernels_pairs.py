"""The batch-1 bitmask path (AVX-512: two rows per step, mask checked after each row) vs the plain-torch reference,
and its handling of inconsistent masks: every ISA this CPU runs, rows in pairs, an odd last row, and the last rows
that are checked before they are read."""

import pytest
import torch

from sparsecraft.kernels import available_isas, load_kernels, make_layout, sparse_linear, sparse_linear_ref
from sparsecraft.patterns import topk_mask

ISAS = [isa for isa in available_isas() if isa != "ref" and load_kernels(isa) is not None]
pytestmark = pytest.mark.skipif(not ISAS, reason="compiled kernels cannot build here")


def _layout(rows: int, cols: int, dtype: torch.dtype, sparsity: float | None, pattern: str = "unstructured"):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    keep = topk_mask(torch.rand(rows, cols, generator=g), sparsity, pattern)
    keep[1] = True  # an all-kept row inside a pair
    keep[2] = False  # an all-pruned row
    return make_layout(torch.where(keep, w, torch.zeros((), dtype=dtype)), keep, "bitmask")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,sparsity,pattern", [
    (64, 256, 0.5, "unstructured"), (65, 320, 0.7, "unstructured"), (33, 70, 0.5, "unstructured"),
    (40, 128, None, "2:4"), (3, 64, 0.9, "unstructured"),
])
def test_batch1_matches_reference(isa, dtype, rows, cols, sparsity, pattern):
    layout = _layout(rows, cols, dtype, sparsity, pattern)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(7)).to(dtype)
    bias = torch.randn(rows).to(dtype)
    got = sparse_linear(layout, x, bias, isa=isa)  # (rows,)
    want = sparse_linear_ref(layout, x.unsqueeze(0), bias)[0]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)


def _flip(mask: torch.Tensor, row: int, bit: int) -> torch.Tensor:
    m = mask.clone()
    m[row, bit // 64] ^= (1 << (bit % 64)) if bit % 64 != 63 else -(1 << 63)
    return m


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("row,bit,message", [
    (10, 5, "mask row 10 keeps"),  # first row of a pair, in the checked-after path
    (11, 40, "mask row 11 keeps"),  # second row of a pair
    (12, 127, "mask row 12 has bits set past column 70"),  # a pad bit
    (63, 3, "mask row 63 keeps"),  # a last row: checked before it is read
])
def test_batch1_inconsistent_mask_raises(isa, row, bit, message):
    layout = _layout(64, 70, torch.float32, 0.5)
    k = load_kernels(isa)
    with pytest.raises(RuntimeError, match=message):
        k.bitmask_linear(_flip(layout.mask, row, bit), layout.values, layout.row_ptr, 70, torch.randn(1, 70), None,
                         False)

