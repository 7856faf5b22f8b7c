"""ReLU-fication and the ProSparse schedule: golden factors, exact zeros after relufy, L1 hooks removed."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from sparsecraft.activation.relufy import ProSparseSchedule, exact_zero_fraction, l1_on_mlp_inputs, relufy_
from sparsecraft.engine.hooks import hook_count


def test_schedule_golden() -> None:
    s = ProSparseSchedule(steps=(10, 20), factors=(1.0, 3.0))
    assert s.factor(0) == 0.0
    assert s.factor(5) == pytest.approx(0.5)  # half-way through the half-cosine ramp
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(20) == pytest.approx(2.0)
    assert s.factor(30) == s.factor(10**6) == 3.0
    with pytest.raises(ValueError, match="one factor per stage"):
        ProSparseSchedule(steps=(1, 2), factors=(1.0,))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])
def test_relufy_gives_exact_zeros_and_l1_trains(arch: str, calib: torch.Tensor) -> None:
    model = tiny_model(arch)
    before = exact_zero_fraction(model, calib)
    assert relufy_(model)
    after = exact_zero_fraction(model, calib)
    assert after > 0.2 and after > before
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with l1_on_mlp_inputs(model) as l1:
        for _ in range(3):
            model(input_ids=calib, use_cache=False)
            loss = l1.take()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert hook_count(model) == 0
    assert exact_zero_fraction(model, calib) > after  # the penalty pushes more activations to zero


def test_relufy_leaves_relu_mlps_alone() -> None:
    model = tiny_model("opt")  # OPT's MLP already uses ReLU
    assert relufy_(model) == []


def test_density_penalty_by_hand_and_it_trains(calib: torch.Tensor) -> None:
    from sparsecraft.activation.relufy import density_penalty

    x = torch.tensor([0.0, 0.0, 1.0, -2.0])
    assert density_penalty(x, beta=1e6).item() == 0.5  # -> the fraction of non-zeros
    torch.testing.assert_close(density_penalty(x, beta=1.0), (torch.tanh(torch.tensor(1.0)) + torch.tanh(torch.tensor(2.0))) / 4)
    model = tiny_model("llama")
    relufy_(model)
    before = exact_zero_fraction(model, calib)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with l1_on_mlp_inputs(model, penalty="density", beta=5.0) as pen:
        for _ in range(3):
            model(input_ids=calib, use_cache=False)
            loss = pen.take()
            assert 0.0 < loss.item() < 1.0
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert hook_count(model) == 0 and exact_zero_fraction(model, calib) > before
    with pytest.raises(ValueError, match="penalty must be one of"):
        with l1_on_mlp_inputs(model, penalty="l0"):
            pass
