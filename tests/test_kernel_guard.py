"""No inconsistent layout reaches a kernel, and valid extreme layouts write nothing outside their output.

The bad-argument cases run in ONE child process (a segfault there fails these tests instead of killing pytest):
it calls each C++ entry point of every compiled ISA with one fault and prints, per case, the error type and message.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsecraft.kernels import available_isas, expand_dense, load_kernels, make_layout, sparse_linear, sparse_linear_ref
from sparsecraft.kernels.colsparse import load_colsparse

ISAS = [isa for isa in available_isas() if isa != "ref" and load_kernels(isa) is not None]
pytestmark = pytest.mark.skipif(not ISAS, reason="compiled kernels cannot build here")

# name -> (the call, with a healthy bitmask layout bm, CSR layout cs of a 6 x 70 weight, x (2, 70); the message).
CASES = {
    "bm values int32": ("k.bitmask_linear(bm.mask, bm.values.int(), bm.row_ptr, 70, x, None, False)", "float32 or bfloat16"),
    "bm mask int32": ("k.bitmask_linear(bm.mask.int(), bm.values, bm.row_ptr, 70, x, None, False)", "mask must be int64"),
    "bm values strided": ("k.bitmask_linear(bm.mask, torch.stack([bm.values, bm.values], 1)[:, 0], bm.row_ptr, 70, x, None, False)", "contiguous"),
    "bm x on meta": ("k.bitmask_linear(bm.mask, bm.values, bm.row_ptr, 70, x.to('meta'), None, False)", "CPU"),
    "bm values on meta": ("k.bitmask_linear(bm.mask, bm.values.to('meta'), bm.row_ptr, 70, x, None, False)", "CPU"),
    "bm row_ptr short": ("k.bitmask_linear(bm.mask, bm.values, bm.row_ptr[:-1], 70, x, None, False)", "row_ptr must be (rows + 1,)"),
    "bm row_ptr int32": ("k.bitmask_linear(bm.mask, bm.values, bm.row_ptr.int(), 70, x, None, False)", "row_ptr must be int64"),
    "bm row_ptr start": ("k.bitmask_linear(bm.mask, bm.values, bm.row_ptr + 1, 70, x, None, False)", "row_ptr[0] must be 0"),
    "bm row_ptr decreasing": ("k.bitmask_linear(bm.mask, bm.values, swap(bm.row_ptr, 2, 3), 70, x, None, False)", "must not decrease"),
    "bm row_ptr end": ("k.bitmask_linear(bm.mask, bm.values[:-1], bm.row_ptr, 70, x, None, False)", "must end at the number of values"),
    "bm row_ptr huge": ("k.bitmask_linear(bm.mask, bm.values, set_(bm.row_ptr, -1, 10**15), 70, x, None, False)", "must end at"),
    "bm no padding": ("k.bitmask_linear(bm.mask[:0], bm.values[:3], bm.row_ptr[:1], 70, x, None, False)", "padding"),
    "bm popcount": ("k.bitmask_linear(flip(bm.mask, 2, 5), bm.values, bm.row_ptr, 70, x, None, False)", "mask row 2 keeps"),
    "bm popcount skip": ("k.bitmask_linear(flip(bm.mask, 4, 1), bm.values, bm.row_ptr, 70, x, None, True)", "mask row 4 keeps"),
    "bm pad bit": ("k.bitmask_linear(flip(bm.mask, 1, 127), bm.values, bm.row_ptr, 70, x, None, False)", "past column 70"),
    "bm words": ("k.bitmask_linear(bm.mask, bm.values, bm.row_ptr, 200, torch.zeros(1, 200), None, False)", "words per row"),
    "bm x width": ("k.bitmask_linear(bm.mask, bm.values, bm.row_ptr, 70, x[:, :69], None, False)", "x must be (..., 70)"),
    "bm x int": ("k.bitmask_linear(bm.mask, bm.values, bm.row_ptr, 70, x.int(), None, False)", "x must be float32"),
    "bm bias shape": ("k.bitmask_linear(bm.mask, bm.values, bm.row_ptr, 70, x, torch.zeros(7), False)", "bias must be (6,)"),
    "bm expand range": ("k.bitmask_expand(bm.mask, bm.values, bm.row_ptr, 70, 2, 7, True)", "not inside"),
    "bm expand negative": ("k.bitmask_expand(bm.mask, bm.values, bm.row_ptr, 70, -1, 2, True)", "not inside"),
    "bm expand out small": ("k.bitmask_expand(bm.mask, bm.values, bm.row_ptr, 70, 0, 6, True, torch.zeros(100))", "out holds"),
    "bm expand out dtype": ("k.bitmask_expand(bm.mask, bm.values, bm.row_ptr, 70, 0, 6, True, torch.zeros(1000, dtype=torch.float64))", "out must be"),
    "bm expand popcount": ("k.bitmask_expand(flip(bm.mask, 3, 0), bm.values, bm.row_ptr, 70, 0, 6, False)", "mask row 3 keeps"),
    "cs col past width": ("k.csr_linear(set_(cs.col, 4, 70), cs.values, cs.row_ptr, 70, x, None)", "= 70 is not a column index"),
    "cs col uint16 max": ("k.csr_linear(set_(cs.col, 0, -1), cs.values, cs.row_ptr, 70, x[:1], None)", "= 65535 is not a column"),
    "cs col int32 negative": ("k.csr_linear(set_(cs.col.int(), 3, -5), cs.values, cs.row_ptr, 70, x[:1], None)", "= -5 is not"),
    "cs col int64": ("k.csr_linear(cs.col.long(), cs.values, cs.row_ptr, 70, x, None)", "int16 (uint16 bits) or int32"),
    "cs col short": ("k.csr_linear(cs.col[:-1], cs.values, cs.row_ptr, 70, x, None)", "one entry per kept weight"),
    "cs int16 wide": ("k.csr_linear(cs.col, cs.values, cs.row_ptr, 70000, torch.zeros(1, 70000), None)", "at most 65536"),
    "cs row_ptr decreasing": ("k.csr_linear(cs.col, cs.values, swap(cs.row_ptr, 1, 2), 70, x, None)", "must not decrease"),
    "cs row_ptr end": ("k.csr_linear(cs.col, cs.values, set_(cs.row_ptr, -1, 10**9), 70, x, None)", "must end at"),
    "cs x width": ("k.csr_linear(cs.col, cs.values, cs.row_ptr, 70, x[:, :3], None)", "x must be (..., 70)"),
    "cs zero columns": ("k.csr_linear(cs.col, cs.values, cs.row_ptr, 0, x[:, :0], None)", "0 columns"),
    "cs expand col": ("k.csr_expand(set_(cs.col, 2, 99), cs.values, cs.row_ptr, 70, 0, 6, True)", "= 99 is not"),
    "cs expand range": ("k.csr_expand(cs.col, cs.values, cs.row_ptr, 70, 4, 3, True)", "not inside"),
    "cj popcount": ("c.colsparse_bitmask_gemv(flip(bt.mask, 10, 3), bt.values, bt.row_ptr, 6, xt, e, 0.0, None)", "keeps"),
    "cj row_ptr end": ("c.colsparse_bitmask_gemv(bt.mask, bt.values[:-2], bt.row_ptr, 6, xt, e, 0.0, None)", "must end at"),
    "cj out width": ("c.colsparse_bitmask_gemv(bt.mask, bt.values, bt.row_ptr, 65, xt, e, 0.0, None)", "words per row"),
    "cj x dtype": ("c.colsparse_bitmask_gemv(bt.mask, bt.values, bt.row_ptr, 6, xt.double(), e, 0.0, None)", "x must be fp32"),
    "cj scale": ("c.colsparse_bitmask_gemv(bt.mask, bt.values, bt.row_ptr, 6, xt, torch.ones(3), 0.0, None)", "scale must be"),
    "cg wt 1-D": ("c.colsparse_gemv(wt.reshape(-1), xt, e, 0.0, None)", "(in, out) matrix"),
    "cg bias": ("c.colsparse_gemv(wt, xt, e, 0.0, torch.zeros(5))", "bias must be fp32 (6,)"),
}

CHILD = textwrap.dedent("""
    import json, sys, torch
    from sparsecraft.kernels import load_kernels, make_layout
    from sparsecraft.kernels.colsparse import load_colsparse, transposed_bitmask
    from sparsecraft.patterns import topk_mask

    def flip(mask, row, bit):
        m = mask.clone()
        m[row, bit // 64] ^= (1 << (bit % 64)) if bit % 64 != 63 else -(1 << 63)
        return m

    def swap(t, i, j):
        t = t.clone(); t[i], t[j] = t[j].clone(), t[i].clone(); return t

    def set_(t, i, v):
        t = t.clone(); t[i] = v; return t

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 70, generator=g)
    keep = topk_mask(torch.rand(6, 70, generator=g), 0.5, "unstructured")
    w = w * keep
    bm, cs = make_layout(w, keep, "bitmask"), make_layout(w, keep, "csr")
    bt = transposed_bitmask(w, keep)
    wt, xt, e = w.t().contiguous(), torch.randn(70, generator=g), torch.empty(0)
    x = torch.randn(2, 70, generator=g)
    c = load_colsparse()
    cases = json.loads(sys.argv[1])
    for isa in sys.argv[2].split(","):
        k = load_kernels(isa)
        for name, (call, _) in cases.items():
            print(json.dumps([isa, name, "started"]), flush=True)
            try:
                eval(call)
                result = ["no error", ""]
            except Exception as err:
                result = [type(err).__name__, str(err).splitlines()[0]]
            print(json.dumps([isa, name] + result), flush=True)
""")


@pytest.fixture(scope="module")
def child_results() -> dict:
    if load_colsparse() is None:
        pytest.skip("the activation-sparse extension cannot build here")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES), ",".join(ISAS)], capture_output=True,
                          text=True, timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    done = {(isa, name): rest for isa, name, *rest in lines if rest[0] != "started"}
    if proc.returncode != 0:
        last = lines[-1] if lines else None
        pytest.fail(f"the child process died with code {proc.returncode} during {last}: {proc.stderr[-2000:]}")
    return done


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_argument_raises_a_clear_error(child_results, isa, name):
    kind, message = child_results[(isa, name)]
    assert kind in ("RuntimeError", "ValueError"), f"{name}: {kind} {message}"
    assert CASES[name][1] in message, message


def _extreme_layouts() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, (rows, cols) in {"one column": (9, 1), "one row": (1, 130), "wide": (5, 129), "tall": (70, 3)}.items():
        w = torch.randn(rows, cols, generator=g)
        keep = torch.rand(rows, cols, generator=g) < 0.5
        keep[0] = True  # a full row
        if rows > 1:
            keep[-1] = False  # an empty row
        out[name] = (w * keep, keep)
    out["all empty"] = (torch.zeros(4, 64), torch.zeros(4, 64, dtype=torch.bool))
    out["all full"] = (torch.randn(3, 64, generator=g), torch.ones(3, 64, dtype=torch.bool))
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["bitmask", "csr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(_extreme_layouts()))
def test_extreme_layouts_stay_inside_their_output(isa, kind, dtype, case):
    w, keep = _extreme_layouts()[case]
    w = w.to(dtype)
    layout = make_layout(w, keep, kind)
    before = {f: getattr(layout, f).clone() for f in ("values", "row_ptr")}
    rows, cols = w.shape
    for batch in (1, 9):
        x = torch.randn(batch, cols).to(dtype)
        got = sparse_linear(layout, x, torch.ones(rows, dtype=dtype), isa=isa)
        torch.testing.assert_close(got, sparse_linear_ref(layout, x, torch.ones(rows, dtype=dtype)), rtol=1e-4, atol=1e-4)
    # the expander writes its rows into a view of a larger buffer whose guard bands hold NaN sentinels
    width = (cols + 63) // 64 * 64 if kind == "bitmask" else cols
    guard = torch.full((16 + rows * width + 16,), float("nan"))
    dense = expand_dense(layout, dtype=torch.float32, out=guard[16:16 + rows * width], isa=isa)
    assert torch.equal(dense, w.float())
    assert guard[:16].isnan().all() and guard[16 + rows * width:].isnan().all()
    assert torch.equal(layout.values, before["values"]) and torch.equal(layout.row_ptr, before["row_ptr"])
