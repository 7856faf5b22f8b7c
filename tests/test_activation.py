"""Activation thresholds: calibration hits its target, detach is exact, buffers save/load/move, greedy hits its target."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from sparsecraft.activation import (
    ActivationThreshold,
    attach,
    calibrate,
    greedy_allocation,
    layer_costs,
    load_thresholds,
    measure,
    model_sparsity,
    save_thresholds,
)
from sparsecraft.activation.allocation import LayerCosts
from sparsecraft.activation.stats import LogHistogram
from sparsecraft.engine.hooks import hook_count


@pytest.fixture(scope="module")
def big_calib() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(2, VOCAB, (8, 32), generator=g)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", ["teal", "wina"])
@pytest.mark.parametrize("target", [0.25, 0.5, 0.7])
def test_thresholds_hit_target_on_calibration_data(arch: str, method: str, target: float,
                                                   big_calib: torch.Tensor) -> None:
    model = tiny_model(arch)
    stats = measure(model, big_calib)
    specs = calibrate(stats, target, method)
    with torch.no_grad(), attach(model, specs, apply=False) as att:  # count on the dense inputs they came from
        model(input_ids=big_calib)
        realized = att.realized()
    assert set(realized) == set(specs)
    for fqn, s in realized.items():
        h = stats[fqn].abs
        expected = max(target, h.zeros / h.total)  # exact zeros (after a ReLU) are sparse at any threshold
        assert abs(s - expected) <= 0.01, (fqn, s)
        assert abs(specs[fqn].sparsity - expected) <= 0.01, (fqn, specs[fqn].sparsity)


def test_histogram_quantile_golden() -> None:
    h = LogHistogram()
    h.update(torch.tensor([0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]))
    assert h.quantile(0.2) == 0.0  # the two exact zeros
    assert h.fraction_below(0.0) == pytest.approx(0.2)
    t = h.quantile(0.5)
    assert 4.0 <= t <= 8.0 and h.fraction_below(t) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_detach_restores_bit_identical_outputs(arch: str, calib: torch.Tensor) -> None:
    model = tiny_model(arch)
    hooks = hook_count(model)
    keys = set(model.state_dict())
    with torch.no_grad():
        dense = model(input_ids=calib).logits
        with attach(model, calibrate(measure(model, calib), 0.5, "teal")):
            sparse = model(input_ids=calib).logits
        after = model(input_ids=calib).logits
    assert not torch.equal(dense, sparse)
    assert torch.equal(dense, after)
    assert hook_count(model) == hooks and set(model.state_dict()) == keys


def test_sparsified_input_is_exactly_thresholded() -> None:
    gate = ActivationThreshold(torch.tensor([1.0, 2.0, 1.0, 0.5]), threshold=1.0)
    x = torch.tensor([[1.5, 0.6, -0.9, -3.0]])
    assert torch.equal(gate(x), torch.tensor([[1.5, 0.6, 0.0, -3.0]]))  # |x|*scale = 1.5, 1.2, 0.9, 1.5


def test_thresholds_survive_save_load_and_to(tmp_path, calib: torch.Tensor) -> None:
    model = tiny_model("llama")
    specs = calibrate(measure(model, calib), 0.5, "wina")
    with torch.no_grad(), attach(model, specs) as att:
        want = model(input_ids=calib).logits
        save_thresholds(att, tmp_path / "t.safetensors", "wina")
        state = {k: v.clone() for k, v in model.state_dict().items() if "act_threshold" in k}
    assert len(state) == 2 * len(specs)
    fresh = tiny_model("llama")
    with torch.no_grad(), load_thresholds(fresh, tmp_path / "t.safetensors") as att2:
        assert torch.equal(fresh(input_ids=calib).logits, want)
        fresh.to(torch.float64)  # buffers follow .to(); the threshold module is the Linear's child
        buf = fresh.model.layers[0].mlp.down_proj.act_threshold.scale
        assert buf.dtype == torch.float64
        got = fresh(input_ids=calib).logits
        fresh.to(torch.float32)
        assert set(state) <= set(fresh.state_dict())
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), attach(tiny_model("llama"), specs) as att3:  # the state-dict route
        att3.model.load_state_dict(model.state_dict() | state)
        assert torch.equal(att3.model(input_ids=calib).logits, want)


def test_greedy_reaches_model_wide_target(calib: torch.Tensor) -> None:
    model = tiny_model("llama")
    stats = measure(model, calib)
    costs = layer_costs(model, calib[:2], stats, "teal", levels=(0.0, 0.2, 0.4, 0.6, 0.8))
    for target in (0.25, 0.5, 0.7):
        plan = greedy_allocation(costs, target)
        assert model_sparsity(plan, costs.weight) == pytest.approx(target, abs=1e-9)
        assert all(0.0 <= s <= 0.8 + 1e-9 for s in plan.values())
        per_block = greedy_allocation(costs, target, per_block=True)
        for block in ("model.layers.0", "model.layers.1"):  # every block reaches the target on its own
            mine = {f: s for f, s in per_block.items() if costs.block[f] == block}
            assert len(mine) == 7 and model_sparsity(mine, costs.weight) == pytest.approx(target, abs=1e-9)
    assert hook_count(model) == 0


def test_greedy_prefers_cheap_layers() -> None:
    costs = LayerCosts((0.0, 0.5), {"a": [0.0, 1.0], "b": [0.0, 0.1]}, {"a": 10, "b": 10}, "teal")
    assert greedy_allocation(costs, 0.25) == {"a": 0.0, "b": 0.5}
    plan = greedy_allocation(costs, 0.375)
    assert plan == {"a": pytest.approx(0.25), "b": 0.5}


def test_bad_inputs_say_how_to_fix(calib: torch.Tensor) -> None:
    model = tiny_model("llama")
    stats = measure(model, calib)
    with pytest.raises(ValueError, match="use one of"):
        calibrate(stats, 0.5, "nope")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        calibrate(stats, 1.5)
    specs = calibrate(stats, 0.5)
    with attach(model, specs), pytest.raises(ValueError, match="detach"):
        attach(model, specs)
    assert hook_count(model) == 0


def test_swapped_linears_match_hooks_and_restore_exactly(calib: torch.Tensor) -> None:
    from sparsecraft.modules import ThresholdedLinear, restore_linears_, swap_linears_

    model = tiny_model("llama")
    specs = calibrate(measure(model, calib), 0.5, "wina")
    with torch.no_grad():
        dense = model(input_ids=calib).logits
        with attach(model, specs):
            want = model(input_ids=calib).logits
            want_one = model(input_ids=calib[:1, :1]).logits  # one token: the kernel path after the swap
        swap_linears_(model, specs)
        assert sum(isinstance(m, ThresholdedLinear) for m in model.modules()) == len(specs)
        torch.testing.assert_close(model(input_ids=calib).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(input_ids=calib[:1, :1]).logits, want_one, rtol=1e-4, atol=1e-4)
        restore_linears_(model)
        assert torch.equal(model(input_ids=calib).logits, dense)


def test_composes_with_weight_pruning(calib: torch.Tensor) -> None:
    from sparsecraft.api import prune

    model = tiny_model("llama")
    result = prune(model, "wanda", 0.5, "unstructured", calib)
    weights = {f: model.get_submodule(f).weight.detach().clone() for f in result.masks}
    with torch.no_grad():
        pruned = model(input_ids=calib).logits
        specs = calibrate(measure(model, calib), 0.5, "wina")  # scale = column norms of the PRUNED weights
        with attach(model, specs, record=True) as att:
            both = model(input_ids=calib).logits
            realized = att.realized()
        assert torch.equal(model(input_ids=calib).logits, pruned)
    assert not torch.equal(both, pruned) and min(realized.values()) > 0.3
    assert all(torch.equal(model.get_submodule(f).weight, w) for f, w in weights.items())
    assert all(torch.equal(specs[f].scale, weights[f].float().norm(dim=0)) for f in weights)

    from sparsecraft.modules import ThresholdedLinear, restore_linears_, swap_linears_

    with torch.no_grad(), attach(model, specs):
        one = model(input_ids=calib[:1, :1]).logits  # one token: the joint kernel after the swap
    swapped = swap_linears_(model, specs, result.masks)
    assert all(m.pruned for f, m in swapped.items() if f in result.masks) and not hasattr(swapped[next(iter(swapped))], "wt")
    assert sum(m.values_t.numel() - 8 for m in swapped.values()) == sum(int(k.sum()) for k in result.masks.values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calib).logits, both, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(input_ids=calib[:1, :1]).logits, one, rtol=1e-4, atol=1e-4)
    assert isinstance(model.get_submodule(next(iter(result.masks))), ThresholdedLinear)
    restore_linears_(model)
    assert all(torch.equal(model.get_submodule(f).weight, w) for f, w in weights.items())
