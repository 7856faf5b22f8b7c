"""CPU kernels vs the plain-torch reference, and the reference vs dense F.linear."""

import pytest
import torch

from sparsecraft.kernels import (
    available_isas,
    current_isa,
    expand_dense,
    isa_scope,
    load_kernels,
    make_layout,
    sparse_linear,
    sparse_linear_ref,
)
from sparsecraft.kernels.build import cpu_has_avx2
from sparsecraft.kernels.layout import layout_keep, layout_to_dense
from sparsecraft.patterns import topk_mask

# Every parity test runs once per compiled ISA this CPU runs (avx512 and/or avx2); "ref" is the reference itself.
ISAS = [isa for isa in available_isas() if isa != "ref" and load_kernels(isa) is not None]
needs_ext = pytest.mark.skipif(not ISAS, reason="compiled kernels cannot build here")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: {}, torch.float16: {}}


def _case(rows: int, cols: int, dtype: torch.dtype, pattern: str, sparsity: float | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    keep = topk_mask(torch.rand(rows, cols, generator=g), sparsity, pattern)
    keep[0] = True  # an all-kept row
    keep[-1] = False  # an all-pruned row
    return torch.where(keep, w, torch.zeros((), dtype=dtype)), keep


SHAPES = [(1, 1), (5, 65), (37, 200), (64, 128), (130, 257)]


def test_extension_builds_on_avx2_machines():
    assert cpu_has_avx2() == ("avx2" in ISAS)
    for isa in ISAS:
        assert load_kernels(isa).isa == isa  # the build that loaded is the one asked for


def test_isa_choice_by_argument_and_scope():
    assert available_isas()[-1] == "ref" and current_isa() == available_isas()[0]
    with isa_scope("ref"):
        assert current_isa() == "ref" and load_kernels() is None
        assert current_isa("ref") == "ref"
    assert current_isa() == available_isas()[0]
    with pytest.raises(ValueError, match="unknown kernel ISA"):
        current_isa("sse9")
    w, keep = _case(5, 65, torch.float32, "unstructured", 0.5)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 65\)"):
        sparse_linear(make_layout(w, keep), torch.randn(2, 64))


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bitmask", "csr"])
@pytest.mark.parametrize("shape", SHAPES + [(3, 1000)])  # 1000 columns: CSR rows long enough for 16-wide gathers
@pytest.mark.parametrize("batch", [1, 3, 8, 13])
def test_kernel_matches_reference(isa, dtype, kind, shape, batch):
    w, keep = _case(*shape, dtype, "unstructured", 0.6)
    layout = make_layout(w, keep, kind)
    x = torch.randn(batch, shape[1]).to(dtype)
    bias = torch.randn(shape[0]).to(dtype)
    tol = TOL[dtype] if shape[1] < 1000 else dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else {}
    torch.testing.assert_close(sparse_linear(layout, x, bias, isa=isa), sparse_linear_ref(layout, x, bias), **tol)
    with isa_scope(isa):
        torch.testing.assert_close(sparse_linear(layout, x), sparse_linear_ref(layout, x), **tol)
    assert torch.equal(expand_dense(layout, isa=isa), w)
    assert torch.equal(expand_dense(layout, dtype=torch.float32, isa=isa), w.float())


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("4:8", None), ("1:4", None), ("4x8", 0.5), ("1x16", 0.7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5])
def test_kernel_patterns(isa, pattern, sparsity, dtype, batch):
    w, keep = _case(24, 96, dtype, pattern, sparsity)
    for kind in ["bitmask", "csr", "auto"]:
        layout = make_layout(w, keep, kind)
        x = torch.randn(batch, 96).to(dtype)
        torch.testing.assert_close(sparse_linear(layout, x, isa=isa), sparse_linear_ref(layout, x), **TOL[dtype])


@pytest.mark.parametrize("isa", ISAS)
def test_block_layout_skips_zero_bytes_and_stays_exact(isa):
    w, keep = _case(16, 1024, torch.float32, "1x64", 0.75)
    layout = make_layout(w, keep, "bitmask")
    assert layout.skip_zero_bytes
    x = torch.randn(2, 1024)
    torch.testing.assert_close(sparse_linear(layout, x, isa=isa), sparse_linear_ref(layout, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["bitmask", "csr"])
def test_reference_matches_dense_linear(dtype, kind):
    w, keep = _case(37, 200, dtype, "unstructured", 0.5)
    layout = make_layout(w, keep, kind)
    x = torch.randn(4, 200).to(dtype)
    expected = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
    torch.testing.assert_close(sparse_linear_ref(layout, x), expected, **TOL[dtype])
    torch.testing.assert_close(sparse_linear(layout, x, use_kernel=False), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["bitmask", "csr"])
@pytest.mark.parametrize("shape", SHAPES)
def test_layouts_are_exact(dtype, kind, shape):
    w, keep = _case(*shape, dtype, "unstructured", 0.5)
    layout = make_layout(w, keep, kind)
    assert torch.equal(layout_keep(layout), keep)
    assert torch.equal(layout_to_dense(layout), w)
    assert torch.equal(expand_dense(layout), w)


def test_csr_handles_columns_above_32767():
    w, keep = _case(2, 40000, torch.float32, "unstructured", 0.95)
    layout = make_layout(w, keep, "csr")
    assert layout.col.dtype == torch.int16 and torch.equal(layout_to_dense(layout), w)
    assert torch.equal(expand_dense(layout), w) and torch.equal(expand_dense(layout, dtype=torch.float32), w)
    x = torch.randn(1, 40000, generator=torch.Generator().manual_seed(1))
    # row 0 keeps all 40,000 weights: fp32 sums in a different order differ by about 1e-6 * sqrt(terms) * |terms|
    torch.testing.assert_close(sparse_linear(layout, x), sparse_linear_ref(layout, x), rtol=1e-4, atol=2e-2)


def test_auto_layout_choice():
    w, keep = _case(64, 64, torch.float32, "unstructured", 0.9)
    assert type(make_layout(w, keep)).__name__ == "CsrLayout"
    w, keep = _case(8, 64, torch.float32, "unstructured", 0.5)
    assert type(make_layout(w, keep)).__name__ == "BitmaskLayout"
    with pytest.raises(ValueError, match="layout kind"):
        make_layout(w, keep, "coo")


def test_random_sparsity_does_not_use_the_zero_byte_branch():
    w, keep = _case(64, 256, torch.float32, "unstructured", 0.9)
    assert not make_layout(w, keep, "bitmask").skip_zero_bytes


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bitmask", "csr"])
def test_prefill_tiles_match_reference(isa, dtype, kind, monkeypatch):
    import sparsecraft.kernels as k

    w, keep = _case(37, 200, dtype, "unstructured", 0.6)
    layout = make_layout(w, keep, kind)
    bias = torch.randn(37).to(dtype)
    for tile_rows in (16, 24, 37):  # several tiles through one reused buffer, the last one partial; one tile
        # (520 tokens: tiles twice as big)
        monkeypatch.setattr(k, "PREFILL_TILE_BYTES", tile_rows * 256 * 4)  # 200 columns are padded to 256
        for tokens in (1, 40, 520):
            x = torch.randn(tokens, 200).to(dtype)
            got, want = k.dense_tiles_linear(layout, x, bias, isa=isa), sparse_linear_ref(layout, x, bias)
            torch.testing.assert_close(got, want, **TOL[dtype])
            assert got.is_contiguous() and got.dtype == dtype
    buffer = torch.full((25 * 256,), float("nan"))
    assert torch.equal(expand_dense(layout, rows=(5, 30), dtype=torch.float32, out=buffer, isa=isa), w[5:30].float())
    assert torch.equal(expand_dense(layout, rows=(5, 30), isa=isa), w[5:30])
    assert torch.equal(expand_dense(layout, rows=(5, 30), dtype=torch.float32, isa=isa), w[5:30].float())
