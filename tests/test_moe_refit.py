"""MoE expert compensation: the down-projection refit (closed form vs a plain lstsq reference, k = E leaves it
unchanged, calibration error falls) and router + expert distillation (only the chosen groups move)."""

import copy

import pytest
import torch

from conftest import VOCAB, tiny_model
from sparsecraft.modules.moe_mlp import MoEMLP
from sparsecraft.moe.moefy import MoEfyConfig, find_gated_mlps, mlp_inputs, moefy_, set_top_k_
from sparsecraft.moe.refit import expert_activations, refit_down_, routing_mask, solve_down
from sparsecraft.moe.router_train import RouterTrainConfig, train_routers_
from sparsecraft.structured.distill import kd_loss


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(2, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))


def moefied(tokens: torch.Tensor, top_k: int, shared: int):
    model = tiny_model("llama")
    inputs = mlp_inputs(model, tokens, list(find_gated_mlps(model)), 10_000)
    moefy_(model, tokens, MoEfyConfig(num_experts=4, top_k=top_k, shared_experts=shared), inputs=inputs)
    return model, inputs


def test_solve_down_equals_stacked_lstsq():
    g = torch.Generator().manual_seed(0)
    A, D = torch.randn(40, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = (torch.rand(40, 6, generator=g) > 0.5).float()
    got = solve_down(A, mask, D, ridge=0.2)
    Am, y = (A * mask).double(), A.double() @ D.double().T
    lam = 0.2 * (Am.T @ Am).diagonal().mean()
    # ridge toward D == least squares on [A_m; sqrt(lam) I] -> [y; sqrt(lam) D^T]
    lhs = torch.cat([Am, lam.sqrt() * torch.eye(6, dtype=torch.float64)])
    rhs = torch.cat([y, lam.sqrt() * D.double().T])
    torch.testing.assert_close(got, torch.linalg.lstsq(lhs, rhs).solution.T)
    torch.testing.assert_close(solve_down(A, torch.ones_like(A), D, 0.2), D.double())  # nothing dropped: D itself


@pytest.mark.parametrize("shared", [0, 1])
def test_refit_lowers_the_error_and_keeps_all_experts_exact(tokens, shared):
    model, inputs = moefied(tokens, top_k=1, shared=shared)
    moe = model.model.layers[0].mlp
    gate_up, router = moe.gate_up.clone(), moe.router_weight.clone()
    x = inputs["model.layers.0.mlp"]
    with torch.no_grad():
        before = moe(x)
        target = expert_activations(moe, x) @ torch.cat(([moe.shared_down] if shared else []) +
                                                        list(moe.down), dim=1).T  # every expert = dense
    errors = refit_down_(model, inputs, ridge=0.1)
    assert set(errors) == set(inputs)
    for err_before, err_after in errors.values():
        assert 0 < err_after < err_before
    with torch.no_grad():
        after = moe(x)
    e0 = (before - target).square().sum() / target.square().sum()
    e1 = (after - target).square().sum() / target.square().sum()
    torch.testing.assert_close(e0.double(), torch.tensor(errors["model.layers.0.mlp"][0], dtype=torch.float64),
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(e1.double(), torch.tensor(errors["model.layers.0.mlp"][1], dtype=torch.float64),
                               rtol=1e-4, atol=1e-7)
    assert torch.equal(moe.gate_up, gate_up) and torch.equal(moe.router_weight, router)  # only down moved
    # the mask covers the shared neurons and exactly top_k experts per token
    mask = routing_mask(moe, x)
    assert mask.sum(1).eq(16 * shared + 16).all()


def test_refit_with_every_expert_changes_nothing(tokens):
    model, inputs = moefied(tokens, top_k=3, shared=1)
    set_top_k_(model, 3)  # all 3 routed experts
    downs = {n: p.clone() for n, p in model.named_parameters() if "down" in n}
    errors = refit_down_(model, inputs, ridge=0.3)
    assert all(e[0] < 1e-12 for e in errors.values())
    for n, p in model.named_parameters():
        if n in downs:
            torch.testing.assert_close(p, downs[n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ridge must be > 0"):
        refit_down_(model, inputs, ridge=0)
    with pytest.raises(ValueError, match="is not a MoEMLP"):
        refit_down_(tiny_model("llama"), inputs)


def test_expert_distillation_trains_experts_and_routers(tokens):
    teacher = tiny_model("llama")
    model = copy.deepcopy(teacher)
    moefy_(model, tokens, MoEfyConfig(num_experts=4, top_k=1, shared_experts=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        kl0 = float(kd_loss(model(tokens).logits, teacher(tokens).logits))
    train_routers_(model, teacher, tokens, RouterTrainConfig(steps=10, batch_size=8, lr=1e-2, expert_lr=1e-3))
    with torch.no_grad():
        kl1 = float(kd_loss(model(tokens).logits, teacher(tokens).logits))
    assert kl1 < 0.8 * kl0, (kl0, kl1)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expert_names = ("gate_up", "down", "router_weight", "router_bias")
    assert moved and all(n.split(".")[-1].replace("shared_", "") in expert_names for n in moved)
    assert any(n.endswith("shared_down") for n in moved) and any(n.endswith(".down") for n in moved)
    assert all(isinstance(m, MoEMLP) and m.relax is None for m in model.modules() if isinstance(m, MoEMLP))
    with pytest.raises(ValueError, match="expert_lr >= 0"):
        RouterTrainConfig(expert_lr=-1.0)


def test_wall_clock_budget_stops_after_one_step(tokens):
    teacher = tiny_model("llama")
    model = copy.deepcopy(teacher)
    moefy_(model, tokens, MoEfyConfig(num_experts=4, top_k=1))
    losses = train_routers_(model, teacher, tokens, RouterTrainConfig(steps=50, batch_size=2, max_seconds=1e-9))
    assert len(losses) == 1
    with pytest.raises(ValueError, match="max_seconds > 0"):
        RouterTrainConfig(max_seconds=0.0)
