"""Learned structure masks (hard-concrete gates): the gate math by hand, gates at init keep everything (bit for bit),
a hard mask equals physical removal, the budget shift holds the planned fraction, golden cases where only some
neurons / KV groups / blocks matter, exact config sizes after a learned shrink, the CLI, and bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import tiny_model
from helpers_cli import make_checkpoint, make_text
from transformers import AutoModelForCausalLM

from sparsecraft.cli import main
from sparsecraft.engine.blocks import find_blocks
from sparsecraft.structured import ShrinkConfig, shrink, spec_for
from sparsecraft.structured import gates as G

AXES = ("mlp", "heads", "depth")


def test_gate_math_by_hand():
    # deterministic gate: clamp(sigmoid(a) * 1.2 - 0.1, 0, 1); sigmoid(0) = 0.5 -> 0.5; sigmoid(3) * 1.2 - 0.1 > 1
    assert G.mean_gate(torch.tensor([0.0, G.INIT_LOG_ALPHA, -3.0])).tolist() == [0.5, 1.0, 0.0]
    # P(z > 0) = sigmoid(a - (2/3) log(0.1 / 1.1)); at a = 0: sigmoid(1.5986...) = 0.83178...
    torch.testing.assert_close(G.keep_prob(torch.tensor(0.0)), torch.tensor(1 / (1 + (1 / 11) ** (2 / 3))))
    gen = torch.Generator().manual_seed(0)
    z = G.sample_gate(torch.tensor([50.0, -50.0, 0.0]).expand(1000, 3), gen)
    assert torch.equal(z[:, 0], torch.ones(1000)) and torch.equal(z[:, 1], torch.zeros(1000))
    hits = (z[:, 2] > 0).float().mean().item()  # the empirical P(z > 0) at a = 0
    assert abs(hits - 0.8318) < 0.04


def test_hard_masks_keep_top_per_row_ties_low():
    la = {"mlp": torch.tensor([[0.0, 2.0, 2.0, -1.0], [5.0, 1.0, 3.0, 4.0]]), "depth": torch.tensor([1.0, 0.0, 1.0])}
    m = G.hard_masks(la, {"mlp": 2, "depth": 2})
    assert m["mlp"].tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]
    assert m["depth"].tolist() == [1, 0, 1]


def test_budget_shift_holds_the_fraction_with_implicit_gradient():
    la = torch.tensor([[3.0, 1.0, -2.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64,
                      requires_grad=True)
    c = G.budget_shift(la, 0.4)
    kept = G.keep_prob(la - c[:, None]).mean(-1)  # (2,)
    torch.testing.assert_close(kept, torch.full((2,), 0.4, dtype=torch.float64))
    kept.sum().backward()  # the constraint holds for any log_alpha: its gradient through the shift is zero
    torch.testing.assert_close(la.grad, torch.zeros_like(la), atol=1e-9, rtol=0)
    # a row already below the target is left alone (c = 0): the gates start where they were initialised
    assert G.budget_shift(torch.full((1, 4), -5.0), 0.9).tolist() == [0.0]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])
def test_gates_at_init_keep_everything(arch, calib):
    model = tiny_model(arch)
    axes = AXES if spec_for(model).width_ok else ("mlp", "depth")
    spec = spec_for(model, axes)
    z = {a: G.mean_gate(la) for a, la in G.init_log_alpha(G.gate_shapes(model, spec, axes)).items()}
    assert all(torch.equal(v, torch.ones_like(v)) for v in z.values())
    ref = model(input_ids=calib).logits
    with G.gated(model, spec, z):
        assert torch.equal(model(input_ids=calib).logits, ref)
    assert torch.equal(model(input_ids=calib).logits, ref)  # hooks gone


def _hard_from(result, model) -> dict[str, torch.Tensor]:
    """The 0/1 gates saying what ``shrink`` removed (from its record), on the dense model's structure."""
    fqn, blocks = find_blocks(model)
    F, Gk, L = 64, 2, len(blocks)
    z = {"mlp": torch.ones(L, F), "heads": torch.ones(L, Gk), "depth": torch.ones(L)}
    for i in range(L):
        for axis, width in (("mlp", F), ("heads", Gk)):
            kept = result.kept.get(f"{fqn}.{i}.{axis}")
            if kept is not None:
                z[axis][i] = 0
                z[axis][i, kept] = 1
    z["depth"][result.dropped_blocks] = 0
    return z


def test_hard_mask_equals_physical_removal_and_config_sizes(tmp_path, calib):
    model = tiny_model("llama")
    model.config.num_hidden_layers = 4  # 4 blocks: 6,176 outside them + 4 x 9,280 = 43,296 parameters
    model = type(model)(model.config).eval()
    dense = copy.deepcopy(model)
    config = ShrinkConfig(params=0.6, axes=AXES, method="learned", tolerance=0.1,
                          gates=G.GateConfig(steps=4, batch_size=2))
    result = shrink(model, calib, config)
    cfg = model.config
    # uniform keep fraction f just under 0.75: round(4f) = 3 blocks, round(64f) = 48 neurons, round(2f) = 1 group;
    # a block is then 1,536 (attention) + 3 x 32 x 48 (MLP) + 64 (norms) = 6,208: 6,176 + 3 x 6,208 = 24,800
    # (57.3%); at f = 0.75 the second group comes back: 29,408 (67.9%), farther from 60%
    assert result.sizes == {"mlp": 48, "heads": 1, "hidden": 32, "depth": 3}
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == \
        (48, 2, 1, 3)
    assert len(result.dropped_blocks) == 1 and len(find_blocks(model)[1]) == 3
    assert result.params == sum(p.numel() for p in model.parameters()) == 24_800
    with torch.no_grad(), G.gated(dense, spec_for(dense, AXES), _hard_from(result, dense)):
        masked = dense(input_ids=calib).logits
    with torch.no_grad():
        got = model(input_ids=calib).logits
    torch.testing.assert_close(got, masked, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in back.parameters()) == result.params
    torch.testing.assert_close(back(input_ids=calib).logits, got)


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_gates_find_what_matters(calib, seed):
    """Block 0 of a 3-block LLaMA uses only neurons {3, 17, 40, 41} and KV group 1; block 1 is the identity. The
    gates, trained to keep 4 of 64 neurons, 1 of 2 groups and 2 of 3 blocks, must find exactly those."""
    model = tiny_model("llama")
    model.config.num_hidden_layers = 3
    model = type(model)(model.config).eval()
    _, blocks = find_blocks(model)
    used = torch.tensor([3, 17, 40, 41])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # sharper distributions: a stronger distillation signal
        down = blocks[0].mlp.down_proj.weight  # (32, 64)
        mask = torch.zeros(64, dtype=torch.bool)
        mask[used] = True
        down[:, ~mask] = 0
        blocks[0].self_attn.o_proj.weight[:, :16] = 0  # KV group 0 = query heads 0, 1 = o_proj columns 0..15
        blocks[1].self_attn.o_proj.weight.zero_()
        blocks[1].mlp.down_proj.weight.zero_()
    spec = spec_for(model, AXES)
    goals = {"mlp": 4 / 64, "heads": 0.5, "depth": 2 / 3}
    la, summary = G.learn_gates(model, spec, calib, goals, G.GateConfig(steps=40, batch_size=2, lr=0.2, seed=seed))
    for a, goal in goals.items():
        assert summary[f"expected_{a}"] == pytest.approx(goal, abs=1e-4)
    hard = G.hard_masks(la, {"mlp": 4, "heads": 1, "depth": 2})
    assert hard["mlp"][0].nonzero().flatten().tolist() == used.tolist()
    assert hard["heads"][0].tolist() == [0.0, 1.0]
    assert hard["depth"].tolist() == [1.0, 0.0, 1.0]  # (ties would have kept blocks 0 and 1)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again


def test_bad_learned_config():
    with pytest.raises(ValueError, match="not hidden channels"):
        ShrinkConfig(axes=("mlp", "hidden"), method="learned")
    with pytest.raises(ValueError, match="learned"):  # the unknown-method message lists it
        ShrinkConfig(method="gates")
    with pytest.raises(ValueError, match="--learn-steps"):
        G.GateConfig(steps=0)


def test_cli_learned(tmp_path):
    model, text = make_checkpoint(tmp_path / "tiny"), make_text(tmp_path / "t.txt", repeats=10)
    out = tmp_path / "out"
    args = ["shrink", str(model), "--params", "0.7", "--axes", "mlp,heads", "--method", "learned",
            "--learn-steps", "3", "--tolerance", "0.1", "--calib", str(text), "--eval", str(text),
            "--nsamples", "4", "--seqlen", "16", "--eval-windows", "2", "--output", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    saved = json.loads((out / "config.json").read_text())
    # 4,128 outside the 2 blocks; one KV group + m neurons: 2 x (1,536 + 64 + 96 m); 70% of 22,688 -> m = 45
    assert saved["intermediate_size"] == report["sizes"]["mlp"] == 45
    assert saved["num_key_value_heads"] == report["sizes"]["heads"] == 1
    assert report["params"] == 15_968
    assert any("learned gates: 3 steps" in n for n in report["notes"])
    assert math.isfinite(report["ppl"])
    assert main([*args[:-2], "--learn-steps", "0", "--output", str(tmp_path / "bad")]) == 2
