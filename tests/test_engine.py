"""The contract matrix (every method x pattern x tiny architecture) and the engine's failure behaviour."""

import copy

import pytest
import torch

from conftest import ARCHS, tiny_model
from sparsecraft.api import prune
from sparsecraft.engine.blocks import find_blocks, find_targets, weight_2d
from sparsecraft.engine.hooks import hook_count
from sparsecraft.engine.record import PartialPruneError
from sparsecraft.methods import METHODS, get_method
from sparsecraft.methods.base import supports
from sparsecraft.patterns import expected_zeros, parse_pattern, satisfies

PATTERNS = [("unstructured", 0.5), ("2:4", None), ("4x4", 0.5)]
CORE = ("magnitude", "random", "wanda", "sparsegpt")  # every architecture; composite methods run on two
CASES = [(a, m, p, s) for m in sorted(METHODS) for p, s in PATTERNS for a in (ARCHS if m in CORE else ARCHS[:2])
         if supports(get_method(m), parse_pattern(p))]


@pytest.mark.parametrize("arch,method,pattern,sparsity", CASES)
def test_contract(arch, method, pattern, sparsity, calib):
    model = tiny_model(arch)
    twin = copy.deepcopy(model)
    hooks = hook_count(model)
    result = prune(model, method, sparsity, pattern, calib, progress=False, seed=7)
    assert hook_count(model) == hooks
    modules = dict(model.named_modules())
    blocks_fqn, blocks = find_blocks(model)
    expected = {f for i, b in enumerate(blocks) for f in find_targets(b, f"{blocks_fqn}.{i}")}
    assert set(result.masks) == expected and expected
    p = parse_pattern(pattern)
    for fqn, keep in result.masks.items():
        w = modules[fqn].weight
        assert keep.shape == w.shape and keep.dtype == torch.bool
        keep2d = keep.T if type(modules[fqn]).__name__ == "Conv1D" else keep  # (out, in)
        assert int((~keep).sum()) == expected_zeros(tuple(weight_2d(modules[fqn]).shape), sparsity, p), fqn
        assert satisfies(keep2d, p), fqn
        assert (w[~keep] == 0).all(), fqn
        assert result.layers[fqn].sparsity == pytest.approx(float((~keep).sum()) / keep.numel())
    # same seed, same masks (and weights)
    again = prune(twin, method, sparsity, pattern, calib, progress=False, seed=7)
    assert all(torch.equal(result.masks[f], again.masks[f]) for f in result.masks)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_calibration_input_unchanged_and_model_still_runs(calib):
    model = tiny_model("llama")
    before = calib.clone()
    prune(model, "wanda", 0.5, "unstructured", calib, progress=False)
    assert torch.equal(calib, before)
    assert torch.isfinite(model(calib).logits).all()


def test_per_layer_plan_and_exclude(calib):
    model = tiny_model("llama")
    plan = {"model.layers.0.mlp.down_proj": 0.75}
    result = prune(model, "magnitude", 0.5, "unstructured", calib, layer_sparsity=plan, exclude=["*.self_attn.*"],
                   progress=False)
    assert all("self_attn" not in f for f in result.masks)
    assert result.layers["model.layers.0.mlp.down_proj"].sparsity == 0.75
    assert result.layers["model.layers.1.mlp.down_proj"].sparsity == 0.5


def test_plan_with_unknown_layer_is_an_error(calib):
    with pytest.raises(ValueError, match="not prunable targets"):
        prune(tiny_model("llama"), "wanda", 0.5, "unstructured", calib, layer_sparsity={"lm_head": 0.5}, progress=False)


def test_embeddings_and_head_untouched(calib):
    model = tiny_model("llama")
    emb, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    prune(model, "sparsegpt", 0.5, "unstructured", calib, progress=False)
    assert torch.equal(model.model.embed_tokens.weight, emb) and torch.equal(model.lm_head.weight, head)


class Exploding:
    """A method that fails on the second block, to test clean failure."""
    needs = ("sqnorm",)

    def prune(self, weight, stats, sparsity, pattern, generator):
        if weight.shape[1] == 64:  # down_proj: raise after q/k/v/o/gate/up of this block were pruned
            raise ValueError("boom")
        keep = torch.ones_like(weight, dtype=torch.bool)
        keep[:, 0] = False
        return weight * keep, keep


def test_failure_in_first_block_restores_it_and_leaves_no_hooks(calib):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    hooks = hook_count(model)
    with pytest.raises(ValueError, match="boom"):
        prune(model, Exploding(), 0.5, "unstructured", calib, progress=False)
    assert hook_count(model) == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failure_after_first_block_says_which_blocks_are_pruned(calib):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    explode_late = Exploding()
    calls = {"n": 0}

    class Late:
        needs = ("sqnorm",)

        def prune(self, weight, stats, sparsity, pattern, generator):
            calls["n"] += 1
            if calls["n"] > 7:  # the 7 layers of block 0 succeed, block 1 fails at its down_proj
                return explode_late.prune(weight, stats, sparsity, pattern, generator)
            keep = torch.ones_like(weight, dtype=torch.bool)
            keep[:, 0] = False
            return weight * keep, keep

    hooks = hook_count(model)
    with pytest.raises(PartialPruneError, match="Blocks 0-0 ARE pruned") as info:
        prune(model, Late(), 0.5, "unstructured", calib, progress=False)
    assert info.value.pruned_blocks == [0]
    assert hook_count(model) == hooks
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.1.mlp.up_proj.weight"], before["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(sd["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert set(info.value.result.masks) == {f for f in info.value.result.masks if f.startswith("model.layers.0.")}


def test_bad_inputs(calib):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="sparsity must be in"):
        prune(model, "wanda", 1.2, "unstructured", calib, progress=False)
    with pytest.raises(ValueError, match="n <= m"):
        prune(model, "wanda", None, "5:4", calib, progress=False)
    with pytest.raises(ValueError, match="multiple of m=64"):
        prune(model, "wanda", None, "2:64", calib, progress=False)
    with pytest.raises(ValueError, match="valid methods"):
        prune(model, "obs", 0.5, "unstructured", calib, progress=False)
    with pytest.raises(ValueError, match="cannot produce the 4x4 pattern"):
        prune(model, "sparsegpt", 0.5, "4x4", calib, progress=False)
    with pytest.raises(ValueError, match="empty"):
        prune(model, "wanda", 0.5, "unstructured", [], progress=False)
    with pytest.raises(ValueError, match="needs calibration"):
        prune(model, "wanda", 0.5, "unstructured", None, progress=False)
    with pytest.raises(ValueError, match="no repeated blocks"):
        prune(torch.nn.Sequential(torch.nn.Linear(4, 4)), "magnitude", 0.5, progress=False)
    bad = tiny_model("llama")
    with torch.no_grad():
        bad.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = copy.deepcopy(bad.state_dict())
    with pytest.raises(ValueError, match="up_proj contains NaN"):
        prune(bad, "wanda", 0.5, "unstructured", calib, progress=False)
    after = bad.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "up_proj" not in k)  # nothing was pruned


def test_nan_activations_are_reported(calib):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[calib[0, 0]] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        prune(model, "wanda", 0.5, "unstructured", calib, progress=False)


def test_data_free_magnitude(calib):
    model = tiny_model("gpt2")
    result = prune(model, "magnitude", 0.5, "2:4", None, progress=False)
    assert result.sparsity == 0.5
