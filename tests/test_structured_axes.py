"""Structured pruning: the rotation (orthogonal, logits unchanged), hidden/depth shrink + plain reload, KV-group
consistency, FLAP bias into a config flag, distillation loss, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from sparsecraft.engine.blocks import find_blocks
from sparsecraft.structured import ShrinkConfig, shrink, spec_for
from sparsecraft.structured import rotate
from sparsecraft.structured.distill import kd_loss
from sparsecraft.structured.stats import calibrate


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen2"])
def test_rotation_is_orthogonal_and_keeps_logits(arch, calib):
    model = tiny_model(arch)
    with torch.no_grad():  # non-trivial norm scales, so folding matters
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.rand_like(p))
    ref = model(input_ids=calib).logits
    spec = spec_for(model, ("hidden",))
    rotate.fold_norms_(model, spec)
    torch.testing.assert_close(model(input_ids=calib).logits, ref, atol=1e-4, rtol=1e-4)
    Q = rotate.principal_basis(calibrate(model, spec, calib, stream_cov=True).stream_cov)
    torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)
    rotate.rotate_(model, spec, Q)
    torch.testing.assert_close(model(input_ids=calib).logits, ref, atol=1e-4, rtol=1e-4)


def test_rotated_slice_reloads_and_counts(tmp_path, calib):
    model = tiny_model("llama")
    result = shrink(model, calib, ShrinkConfig(params=0.9, axes=("hidden",), rotate=True, tolerance=0.1))
    assert model.config.hidden_size == result.sizes["hidden"] < 32
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in back.parameters()) == result.params
    torch.testing.assert_close(back(input_ids=calib).logits, model(input_ids=calib).logits)


@pytest.mark.parametrize("arch", ["llama", "gemma", "phi"])
def test_hidden_and_depth_reload(arch, tmp_path, calib):
    model = tiny_model(arch)
    model.config.num_hidden_layers = 2
    result = shrink(model, calib, ShrinkConfig(params=0.5, axes=("hidden", "depth"), method="activation",
                                               tolerance=0.3))
    assert len(find_blocks(model)[1]) == result.sizes["depth"] == 1
    assert model.config.num_hidden_layers == 1
    if getattr(model.config, "layer_types", None):
        assert len(model.config.layer_types) == 1
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(back(input_ids=calib).logits, model(input_ids=calib).logits)
    out = back.generate(calib[:1, :4], max_new_tokens=3, do_sample=False)  # the KV cache works with renumbered blocks
    assert out.shape == (1, 7)


def test_gemma_hidden_keeps_embedding_scale(calib):
    """Gemma multiplies embeddings by sqrt(hidden_size): the surgery rescales so kept channels are unchanged."""
    model = tiny_model("gemma")
    emb_before = model.get_submodule("model.embed_tokens")(calib)
    result = shrink(model, calib, ShrinkConfig(params=0.9, axes=("hidden",), method="magnitude", tolerance=0.1))
    keep = torch.tensor(result.kept["hidden"])
    torch.testing.assert_close(model.get_submodule("model.embed_tokens")(calib), emb_before[..., keep])


def test_kv_groups_stay_consistent(calib):
    model = tiny_model("llama")  # 4 heads, 2 KV heads, head_dim 8
    shrink(model, calib, ShrinkConfig(params=0.85, axes=("heads",), tolerance=0.05))
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 8)
    attn = find_blocks(model)[1][0].self_attn
    assert attn.q_proj.weight.shape == (16, 32) and attn.k_proj.weight.shape == (8, 32)
    assert attn.o_proj.weight.shape == (32, 16)


def test_flap_turns_on_the_bias_flag_and_compensates(calib):
    model = tiny_model("llama")
    result = shrink(model, calib, ShrinkConfig(params=0.8, axes=("mlp",), method="flap", tolerance=0.05))
    assert model.config.mlp_bias is True
    down = find_blocks(model)[1][0].mlp.down_proj
    assert down.bias is not None and down.bias.abs().sum() > 0
    assert result.params == sum(p.numel() for p in model.parameters())


def test_kd_loss_zero_for_equal_logits():
    x = torch.randn(2, 3, 5)
    assert kd_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(x, torch.randn(2, 3, 5)).item() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(params=1.5), "in \\(0, 1\\]"),
    (dict(params=0.0), "in \\(0, 1\\]"),
    (dict(axes=("width",)), "unknown axes"),
    (dict(method="taylor"), "unknown structured method"),
    (dict(depth_method="random"), "unknown depth method"),
    (dict(rotate=True, axes=("mlp",)), "add hidden"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShrinkConfig(**kwargs)


def test_refusals(calib):
    with pytest.raises(ValueError, match="cannot lose heads"):
        shrink(tiny_model("gpt2"), calib, ShrinkConfig(axes=("heads",)))
    with pytest.raises(ValueError, match="not reachable"):  # heads alone cannot remove half the parameters
        shrink(tiny_model("llama"), calib, ShrinkConfig(params=0.5, axes=("heads",)))
    with pytest.raises(ValueError, match="RMSNorm"):
        shrink(tiny_model("phi"), calib, ShrinkConfig(axes=("hidden",), rotate=True))
    model = tiny_model("llama")
    model.config.model_type = "mamba"
    with pytest.raises(ValueError, match="no known config mapping"):
        shrink(model, calib, ShrinkConfig())


def test_dense_untouched_when_refused(calib):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError):
        shrink(model, calib, ShrinkConfig(params=0.5, axes=("heads",)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
