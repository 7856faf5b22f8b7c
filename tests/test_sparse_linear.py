"""SparseLinear: exact from_dense/to_dense, parity with dense Linear, the prefill rule, model swap and reload."""

import pytest
import torch
from torch import nn

from sparsecraft.patterns import NM, Block, Unstructured, topk_mask
from sparsecraft.checkpoint import load_packed_model_, save_packed
from sparsecraft.modules import DENSE_MIN_TOKENS, SparseLinear, sparsify_model_, use_dense_path

CASES = [(Unstructured(), 0.5), (Unstructured(), 0.9), (NM(2, 4), None), (NM(4, 8), None), (Block(4, 8), 0.5)]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: {}}


def _linear(in_f: int, out_f: int, dtype: torch.dtype, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("pattern,sparsity", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_dense_to_dense_is_exact_and_forward_matches(pattern, sparsity, dtype):
    lin = _linear(96, 40, dtype)
    keep = topk_mask(lin.weight.float().abs(), sparsity, pattern)
    sparse = SparseLinear.from_dense(lin, keep, pattern)
    back = sparse.to_dense()
    assert torch.equal(back.weight, torch.where(keep, lin.weight, torch.zeros((), dtype=dtype)))
    assert torch.equal(back.bias, lin.bias) and torch.equal(sparse.keep(), keep)
    for tokens in [1, 3, 8, 13, 29, 70]:  # 29 and 70 cross both bitmask prefill thresholds, 13 two token groups
        x = torch.randn(tokens, 96).to(dtype)
        torch.testing.assert_close(sparse(x), back(x).to(dtype), **TOL[dtype])
    x3 = torch.randn(2, 3, 96).to(dtype)  # (batch, seq, in)
    assert sparse(x3).shape == (2, 3, 40)


def test_prefill_rule_and_both_paths_agree():
    fp32, bf16 = torch.float32, torch.bfloat16
    start = DENSE_MIN_TOKENS[("bitmask", fp32)]
    assert not use_dense_path(1, "bitmask", fp32) and not use_dense_path(start - 1, "bitmask", fp32)
    assert use_dense_path(start, "bitmask", fp32) and use_dense_path(4096, "bitmask", fp32)
    bf16_start = DENSE_MIN_TOKENS[("bitmask", bf16)]
    assert bf16_start > start and not use_dense_path(bf16_start - 1, "bitmask", bf16)  # torch's bf16 GEMM is slow here
    assert use_dense_path(bf16_start, "bitmask", bf16)
    csr_start = DENSE_MIN_TOKENS[("csr", fp32)]
    assert not use_dense_path(csr_start - 1, "csr", fp32, 0.8) and use_dense_path(csr_start, "csr", bf16, 0.85)
    assert not use_dense_path(10**6, "csr", fp32, 0.9) and not use_dense_path(10**6, "csr", bf16, 0.95)  # never
    assert use_dense_path(5, "csr", fp32, 0.9, dense_min_tokens=5) and not use_dense_path(4, "bitmask", fp32, 0.5, 5)
    very_sparse = SparseLinear.from_dense(_linear(64, 32, fp32), topk_mask(torch.rand(32, 64), 0.9, "unstructured"))
    assert very_sparse.kind == "csr" and very_sparse.sparsity == 1 - 205 / 2048 and very_sparse.dense_from_tokens() is None
    assert "prefill=kernel at any length" in repr(very_sparse)
    sparse80 = SparseLinear.from_dense(_linear(64, 32, fp32), topk_mask(torch.rand(32, 64), 0.85, "unstructured"))
    assert sparse80.kind == "csr" and sparse80.dense_from_tokens() == csr_start
    lin = _linear(64, 32, torch.float32, bias=False)
    sparse = SparseLinear.from_dense(lin, topk_mask(lin.weight.abs(), 0.7, "unstructured"))
    assert f"prefill=dense tiles from {start} tokens" in repr(sparse)
    x = torch.randn(start, 64)
    calls = []
    import sparsecraft.modules.sparse_linear as sl

    original = sl.dense_tiles_linear
    sl.dense_tiles_linear = lambda *a: calls.append(1) or original(*a)
    try:
        dense_path = sparse(x)
        sparse(x[:3])
    finally:
        sl.dense_tiles_linear = original
    assert calls == [1]  # the prefill call went dense, the 3-token call did not
    sparse.dense_min_tokens = 10**9  # force the sparse kernel on the same input
    torch.testing.assert_close(sparse(x), dense_path, rtol=1e-4, atol=1e-4)


def test_from_dense_rejects_bad_masks():
    lin = _linear(16, 8, torch.float32)
    with pytest.raises(ValueError, match="torch.bool"):
        SparseLinear.from_dense(lin, torch.ones(8, 16))
    with pytest.raises(ValueError, match="does not satisfy"):
        SparseLinear.from_dense(lin, torch.ones(8, 16, dtype=torch.bool), "2:4")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.block = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight  # tied, like many LMs

    def forward(self, ids):
        return self.head(self.block(self.emb(ids)))


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_sparsify_save_and_reload_bit_exact(pattern, tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    masks = {f: topk_mask(model.get_submodule(f).weight.abs(), 0.5 if pattern != "2:4" else None, pattern) for f in ["block.0", "block.2"]}
    dense_ref = {f: torch.where(masks[f], model.get_submodule(f).weight, 0.0) for f in masks}
    summary = sparsify_model_(model, masks, pattern)
    assert summary["replaced"] == ["block.0", "block.2"] and summary["sparse_bytes"] < 0.6 * summary["dense_bytes"]
    assert isinstance(model.block[0], SparseLinear)
    assert torch.equal(model.block[0].dense_weight(), dense_ref["block.0"])
    ids = torch.randint(0, 50, (1, 7))
    out = model(ids)
    save_packed(model, {}, None, tmp_path / "m.safetensors")
    fresh = _Tiny()
    info = load_packed_model_(fresh, str(tmp_path / "m.safetensors"))
    assert info["sparse"] == ["block.0", "block.2"]
    assert torch.equal(fresh.block[2].dense_weight(), dense_ref["block.2"])
    assert torch.equal(fresh.emb.weight, model.emb.weight) and fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh(ids), out)
    from sparsecraft.checkpoint import load_packed_state_dict  # the prune command's reader sees the same weights

    assert torch.equal(load_packed_state_dict(tmp_path / "m.safetensors")["block.0.weight"], dense_ref["block.0"])


def test_sparsify_names_unknown_modules():
    with pytest.raises(ValueError, match="not nn.Linear"):
        sparsify_model_(_Tiny(), {"block.1": torch.ones(1, dtype=torch.bool)}, "unstructured")


def test_loads_the_prune_commands_packed_checkpoint(tmp_path):
    from sparsecraft.checkpoint import load_packed_state_dict, save_packed

    torch.manual_seed(1)
    model = _Tiny()
    masks = {"block.0": topk_mask(model.block[0].weight.abs(), None, "2:4")}
    save_packed(model, masks, NM(2, 4), tmp_path / "p.safetensors")
    dense_state = load_packed_state_dict(tmp_path / "p.safetensors")
    fresh = _Tiny()
    info = load_packed_model_(fresh, str(tmp_path / "p.safetensors"))
    assert info["sparse"] == ["block.0"]
    assert torch.equal(fresh.block[0].dense_weight(), dense_state["block.0.weight"])
    assert torch.equal(fresh.block[0].dense_weight(), torch.where(masks["block.0"], model.block[0].weight, 0.0))
