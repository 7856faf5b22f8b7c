"""Structured pruning: golden cases worked by hand, the contract matrix (every architecture shrinks, reloads with
plain transformers and equals the masked model), KV-group consistency, the rotation, and bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ARCHS, VOCAB, tiny_model

from sparsecraft.engine.blocks import find_blocks, weight_2d
from sparsecraft.structured import ShrinkConfig, shrink, spec_for
from sparsecraft.structured import importance as imp
from sparsecraft.structured.arch import kv_heads
from sparsecraft.structured.shrink import head_scores, mlp_scores
from sparsecraft.structured.stats import Calibration, ChannelStats
from sparsecraft.structured.surgery import compensation


def _stats(rows: list[list[float]]) -> ChannelStats:
    s = ChannelStats()
    s.update(torch.tensor(rows))
    return s


# ---------------------------------------------------------------- golden cases, worked by hand

def test_channel_scores_by_hand():
    W = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, -1.0]])  # (out 2, in 3)
    x = _stats([[1.0, 0.0, 2.0], [-1.0, 0.0, 2.0]])  # norm = [sqrt2, 0, sqrt8]; mean|x| = [1, 0, 2]; var = [2, 0, 0]
    assert torch.equal(imp.column_scores("magnitude", W, None), torch.tensor([10.0, 4.0, 1.0], dtype=torch.float64))
    assert torch.equal(imp.column_scores("magnitude-l1", W, None), torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(imp.column_scores("wanda", W, x),
                               torch.tensor([4 * 2**0.5, 0.0, 8**0.5], dtype=torch.float64))
    assert torch.equal(imp.column_scores("activation", W, x), torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    assert torch.equal(imp.column_scores("flap", W, x), torch.tensor([20.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(imp.row_scores("wanda", W, x),
                               torch.tensor([2**0.5, 3 * 2**0.5 + 8**0.5], dtype=torch.float64))


def test_keep_top_ties_keep_lower_index():
    assert imp.keep_top(torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0]), 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="keep between 1 and 3"):
        imp.keep_top(torch.ones(3), 0)


def test_depth_choice_by_hand():
    # 4 blocks, boundaries 0..4; consecutive cosines 0.2, 0.9, 0.95, 0.5 -> BI = 0.8, 0.1, 0.05, 0.5
    cos = torch.eye(5, dtype=torch.float64)
    for i, c in enumerate([0.2, 0.9, 0.95, 0.5]):
        cos[i, i + 1] = cos[i + 1, i] = c
    cos[1, 3] = 0.85  # x_1 vs x_3: run (1, 2) is the closest pair of consecutive blocks
    cos[0, 2], cos[2, 4] = 0.1, 0.4
    assert imp.blocks_to_drop(cos, 1, "block-influence") == [2]
    assert imp.blocks_to_drop(cos, 2, "block-influence") == [1, 2]
    assert imp.blocks_to_drop(cos, 2, "angular") == [1, 2]
    assert imp.blocks_to_drop(cos, 1, "angular") == [2]


def test_flap_compensation_by_hand():
    W = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    mean = torch.tensor([5.0, 7.0, -1.0])
    # remove channels 1 and 2: 2*7 + 3*(-1) = 11 and -1*7 + 1*(-1) = -8
    assert compensation(W, mean, torch.tensor([1, 2])).tolist() == [11.0, -8.0]


def test_which_neuron_and_head_go():
    model = tiny_model("llama")
    spec = spec_for(model, ("mlp", "heads"))
    _, blocks = find_blocks(model)
    cal = Calibration()
    h = torch.zeros(2, 64)
    h[:, [5, 9, 40]] = torch.tensor([[3.0, -2.0, 1.0], [3.0, 2.0, 1.0]])  # mean |h|: 3 at 5, 2 at 9, 1 at 40
    cal.inputs["model.layers.0.mlp.down_proj"] = _stats(h.tolist())
    assert imp.keep_top(mlp_scores(blocks[0], "model.layers.0", spec, cal, "activation"), 2).tolist() == [5, 9]
    a = torch.zeros(1, 32)  # o_proj input: 4 heads of 8 channels, 2 KV groups of 2 heads (16 channels each)
    a[0, 20] = 1.0  # a channel of head 2 -> KV group 1
    cal.inputs["model.layers.0.self_attn.o_proj"] = _stats(a.tolist())
    scores = head_scores(blocks[0], "model.layers.0", spec, cal, "activation", model.config)
    assert scores.tolist() == [0.0, 1.0]
    assert imp.keep_top(scores, 1).tolist() == [1]


# ---------------------------------------------------------------- the contract matrix

def _axes(arch: str) -> tuple[str, ...]:
    return ("mlp", "heads") if spec_for(tiny_model(arch)).width_ok else ("mlp",)


def _masked_like(model: torch.nn.Module, arch: str, kept: dict[str, list[int]]) -> torch.nn.Module:
    """The dense model with the removed neurons / heads zeroed (consumer columns only: that is enough)."""
    masked = copy.deepcopy(model)
    spec = spec_for(masked)
    fqn, blocks = find_blocks(masked)
    cfg = masked.config
    for i, block in enumerate(blocks):
        if f"{fqn}.{i}.mlp" in kept:
            W = weight_2d(block.get_submodule(spec.mlp_out))
            drop = torch.ones(W.shape[1], dtype=torch.bool)
            drop[kept[f"{fqn}.{i}.mlp"]] = False
            with torch.no_grad():
                W[:, drop] = 0
        if f"{fqn}.{i}.heads" in kept:
            W = weight_2d(block.get_submodule(spec.o))
            group = W.shape[1] // kv_heads(cfg)
            drop = torch.ones(W.shape[1], dtype=torch.bool)
            for g in kept[f"{fqn}.{i}.heads"]:
                drop[g * group:(g + 1) * group] = False
            with torch.no_grad():
                W[:, drop] = 0
    return masked


RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[1]))
    out = {}
    for folder in sys.argv[2:]:
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            out[folder] = m(input_ids=ids).logits.tolist()
    assert sys.modules.get("sparsecraft") is None  # blocked: importing it would raise
    print(json.dumps(out))
""")


def test_every_arch_shrinks_reloads_and_equals_masked(tmp_path, calib):
    folders, expected = [], {}
    for arch in ARCHS:
        model = tiny_model(arch)
        result = shrink(model, calib,
                        ShrinkConfig(params=0.8, axes=_axes(arch), method="wanda", tolerance=0.15))
        assert result.params == sum(p.numel() for p in model.parameters())
        dense = tiny_model(arch)
        masked = _masked_like(dense, arch, result.kept)
        with torch.no_grad():
            got = model(input_ids=calib).logits
            torch.testing.assert_close(got, masked(input_ids=calib).logits, atol=1e-5, rtol=1e-5)
        model.save_pretrained(tmp_path / arch)
        folders.append(str(tmp_path / arch))
        expected[str(tmp_path / arch)] = got
    # plain transformers in a fresh interpreter that never imports sparsecraft
    env_code = "import sys; sys.modules['sparsecraft'] = None\n" + RELOAD
    done = subprocess.run([sys.executable, "-c", env_code, json.dumps(calib.tolist()), *folders],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reloaded = json.loads(done.stdout.strip().splitlines()[-1])
    for folder, logits in reloaded.items():
        torch.testing.assert_close(torch.tensor(logits), expected[folder], atol=1e-5, rtol=1e-5)
