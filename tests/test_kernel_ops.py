"""The kernels as torch custom ops: opcheck (schema, fake tensors, dispatch) and torch.compile equal to eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsecraft.kernels import available_isas, load_kernels, make_layout, sparse_linear
from sparsecraft.kernels import ops  # noqa: F401  (registers torch.ops.sparsecraft.*)
from sparsecraft.modules import SparseLinear
from sparsecraft.patterns import topk_mask

ISAS = [isa for isa in available_isas() if isa != "ref" and load_kernels(isa) is not None] + ["ref"]


def _layout(kind: str, dtype: torch.dtype = torch.float32, rows: int = 12, cols: int = 70):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    keep = topk_mask(torch.rand(rows, cols, generator=g), 0.6, "unstructured")
    return make_layout(w * keep, keep, kind), w * keep


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["bitmask", "csr"])
def test_opcheck(isa, kind):
    layout, _ = _layout(kind)
    x, bias = torch.randn(3, 70), torch.randn(12)
    if kind == "bitmask":
        args = (layout.mask, layout.values, layout.row_ptr, 70, x, bias, False, isa)
        torch.library.opcheck(torch.ops.sparsecraft.bitmask_linear.default, args)
        torch.library.opcheck(torch.ops.sparsecraft.bitmask_expand.default,
                              (layout.mask, layout.values, layout.row_ptr, 70, True, isa))
    else:
        args = (layout.col, layout.values, layout.row_ptr, 70, x, bias, isa)
        torch.library.opcheck(torch.ops.sparsecraft.csr_linear.default, args)
        torch.library.opcheck(torch.ops.sparsecraft.csr_expand.default,
                              (layout.col, layout.values, layout.row_ptr, 70, False, isa))


class Tiny(nn.Module):
    """A dense layer, a sparse layer called through ``sparse_linear``, a nonlinearity: what a packed MLP does."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        self.up = nn.Linear(16, 70)

    def forward(self, x):
        return sparse_linear(self.layout, torch.relu(self.up(x))) * 2.0


@pytest.mark.parametrize("kind", ["bitmask", "csr"])
def test_compiled_module_equals_eager(kind):
    torch._dynamo.reset()
    layout, _ = _layout(kind)
    model = Tiny(layout).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)  # fullgraph: the op is traced
    torch.testing.assert_close(compiled, eager)


def test_inductor_compiles_a_sparse_linear_model():
    torch._dynamo.reset()
    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    keep = topk_mask(linear.weight.detach().abs(), None, "2:4")
    model = nn.Sequential(SparseLinear.from_dense(linear, keep, "2:4"), nn.GELU()).eval()
    x = torch.randn(1, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager)
