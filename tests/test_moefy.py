"""Dense -> MoE: balanced clustering, router fit, MoEMLP golden math, k = E equals dense, save / load round trip."""

import copy

import pytest
import torch
from torch import nn

from conftest import VOCAB, tiny_model
from helpers_cli import TEXT, char_tokenizer
from sparsecraft.modules.moe_mlp import MoEMLP
from sparsecraft.moe.moefy import (MoEfyConfig, balanced_kmeans, fit_router, load_moefied, moefy_, save_moefied,
                                   set_top_k_)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(2, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))


def test_balanced_kmeans_golden():
    a, b, c = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])
    noise = 0.01 * torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    feats = torch.stack([a, b, c, c, a, b]) + noise
    assert balanced_kmeans(feats, 3, seed=1).tolist() == [0, 1, 2, 2, 0, 1]  # numbered by first member
    unbalanced = torch.stack([a, a, a, a, b, b]) + noise  # natural clusters 4 + 2 -> forced 3 + 3
    labels = balanced_kmeans(unbalanced, 2, seed=0)
    assert torch.bincount(labels).tolist() == [3, 3] and labels[4] == labels[5]
    with pytest.raises(ValueError, match="equal experts"):
        balanced_kmeans(feats, 4)


def test_fit_router_recovers_a_linear_map():
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    W, b = torch.randn(3, 5), torch.tensor([0.5, -1.0, 2.0])
    w_fit, b_fit = fit_router(x, x @ W.T + b, ridge=0.0)
    torch.testing.assert_close(w_fit.float(), W, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_fit.float(), b, rtol=1e-5, atol=1e-5)


def golden_moe(shared: bool) -> MoEMLP:
    """H = 2, two experts of one neuron, ReLU: f0(x) = (relu(x0) x0, 0), f1(x) = (0, 2 relu(x1) x1); router = x."""
    gate_up = torch.tensor([[[1.0, 0], [1.0, 0]], [[0, 1.0], [0, 1.0]]])  # (E=2, 2Ie=2, H=2)
    down = torch.tensor([[[1.0], [0]], [[0], [2.0]]])  # (E, H, Ie=1)
    extra = (torch.tensor([[1.0, 1.0], [1.0, 0]]), torch.tensor([[1.0], [1.0]])) if shared else (None, None)
    return MoEMLP(gate_up, down, torch.eye(2), torch.zeros(2), 1, nn.ReLU(), *extra)  # shared: relu(x0+x1) x0


def test_moe_mlp_golden():
    x = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    moe = golden_moe(shared=False)
    assert moe(x).tolist() == [[9.0, 0.0], [0.0, 8.0]]  # token 0 -> expert 0, token 1 -> expert 1
    assert moe(x[:1]).tolist() == [[9.0, 0.0]] and moe(x[1:]).tolist() == [[0.0, 8.0]]  # the batch-1 path
    assert golden_moe(shared=True)(x).tolist() == [[21.0, 12.0], [3.0, 11.0]]  # + relu(x0 + x1) * x0 on both dims
    moe.top_k = 2
    assert moe(x).tolist() == [[9.0, 2.0], [1.0, 8.0]]  # both experts = the dense MLP


def test_unselected_experts_are_never_read():
    """NaN in every expert the router does not pick: a module that computed them would return NaN."""
    moe = golden_moe(shared=False)
    x = torch.tensor([[3.0, 1.0]])  # picks expert 0
    with torch.no_grad():
        moe.gate_up[1] = float("nan")
    assert moe(x).tolist() == [[9.0, 0.0]]  # batch 1
    assert moe(torch.cat([x, 2 * x])).tolist() == [[9.0, 0.0], [36.0, 0.0]]  # many tokens, none for expert 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("shared", [0, 1])
def test_all_experts_equal_the_dense_model(arch, shared, tokens):
    model = tiny_model(arch)
    with torch.no_grad():
        ref = model(tokens).logits
    config = MoEfyConfig(num_experts=4, top_k=4 - shared, shared_experts=shared)
    result = moefy_(model, tokens, config)
    moes = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert len(moes) == 2 and len(result.plans) == 2
    for plan in result.plans.values():
        assert sorted(plan.order.tolist()) == list(range(64)) and plan.expert_size == 16
        assert plan.shared_size == 16 * shared
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, ref, rtol=1e-5, atol=1e-5)
        set_top_k_(model, 1)
        assert not torch.allclose(model(tokens).logits, ref, atol=1e-3)  # fewer experts: a different model


def test_batch_one_equals_batched_and_shared_holds_top_neurons(tokens):
    model = tiny_model("llama")
    twin = copy.deepcopy(model)
    result = moefy_(model, tokens, MoEfyConfig(num_experts=4, top_k=2, shared_experts=1))
    moe = model.model.layers[0].mlp
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = moe(x)
        single = torch.cat([moe(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(single, batched, rtol=1e-5, atol=1e-6)
    # the shared expert holds the 16 neurons with the largest mean |a_i| * ||down[:, i]|| on the calibration inputs
    mlp = twin.model.layers[0].mlp
    seen = []
    h = mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        twin(tokens)
        h.remove()
        xs = torch.cat(seen)
        a = mlp.act_fn(mlp.gate_proj(xs)) * mlp.up_proj(xs)
    importance = a.abs().mean(0) * mlp.down_proj.weight.norm(dim=0)
    plan = result.plans["model.layers.0.mlp"]
    assert set(plan.order[:16].tolist()) == set(importance.topk(16).indices.tolist())


def test_save_and_load_round_trip(tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    with torch.no_grad():
        dense = model(tokens).logits
    moefy_(model, tokens, MoEfyConfig(num_experts=4, top_k=2, shared_experts=1, router="centroid"))
    with torch.no_grad():
        moe_logits = model(tokens).logits
    save_moefied(model, tmp_path)
    char_tokenizer(TEXT).save_pretrained(tmp_path)  # load_moefied loads the folder like any checkpoint
    assert any(isinstance(m, MoEMLP) for m in model.modules())  # the dense view was swapped back
    loaded, _ = load_moefied(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, moe_logits)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # the permuted dense model
        torch.testing.assert_close(plain(tokens).logits, dense, rtol=1e-5, atol=1e-5)


def test_bad_inputs(tokens):
    with pytest.raises(ValueError, match="top_k must be in"):
        MoEfyConfig(num_experts=8, top_k=8, shared_experts=1)
    with pytest.raises(ValueError, match="router must be one of"):
        MoEfyConfig(router="mlp")
    with pytest.raises(ValueError, match="shared_experts"):
        MoEfyConfig(num_experts=4, shared_experts=4)
    with pytest.raises(ValueError, match="equal experts"):
        moefy_(tiny_model("llama"), tokens, MoEfyConfig(num_experts=5, top_k=1))
    with pytest.raises(ValueError, match="no gated MLP"):
        moefy_(tiny_model("gpt2"), tokens, MoEfyConfig(num_experts=4, top_k=1))
    with pytest.raises(ValueError, match="no moe.safetensors"):
        from sparsecraft.moe.moefy import attach_moe_

        attach_moe_(tiny_model("llama"), "/nonexistent")


def test_relaxed_forward_equals_top_k_and_reaches_every_score():
    from sparsecraft.moe.router_train import train_routers_  # noqa: F401  (module imports cleanly)

    moe = golden_moe(shared=True)
    x = torch.tensor([[3.0, 1.0], [1.0, 2.0], [0.5, -1.0]])
    exact = moe(x)
    moe.relax = 0.5
    relaxed = moe(x)
    torch.testing.assert_close(relaxed, exact)
    relaxed.sum().backward()
    # token 0 picks expert 0; expert 1 (not run in the exact path) still gets a gradient through the soft mask
    assert moe.router_weight.grad is not None and (moe.router_weight.grad[1] != 0).any()
    assert (moe.router_weight.grad[0] != 0).any()


def test_router_distillation_lowers_the_kl(tokens):
    from sparsecraft.moe.router_train import RouterTrainConfig, train_routers_
    from sparsecraft.structured.distill import kd_loss

    teacher = tiny_model("llama")
    model = copy.deepcopy(teacher)
    moefy_(model, tokens, MoEfyConfig(num_experts=4, top_k=1, router="centroid"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "router" not in n}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        before = float(kd_loss(model(tokens).logits, teacher(tokens).logits))
    losses = train_routers_(model, teacher, tokens, RouterTrainConfig(steps=30, batch_size=8, lr=1e-2))
    with torch.no_grad():
        after = float(kd_loss(model(tokens).logits, teacher(tokens).logits))
    assert len(losses) == 30 and after < 0.9 * before, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # only routers moved
    assert all(m.relax is None for m in model.modules() if isinstance(m, MoEMLP))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored


@pytest.mark.parametrize("shared", [0, 1])
def test_each_token_runs_exactly_the_dense_neurons_of_its_experts(tokens, shared):
    """Reference: the ORIGINAL dense MLP restricted to the shared neurons + the chosen experts' neurons (plan.order)."""
    model = tiny_model("llama")
    dense = copy.deepcopy(model.model.layers[1].mlp)
    result = moefy_(model, tokens, MoEfyConfig(num_experts=4, top_k=2 - shared, shared_experts=shared))
    moe, plan = model.model.layers[1].mlp, result.plans["model.layers.1.mlp"]
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(5))
    s, ie = plan.shared_size, plan.expert_size
    with torch.no_grad():
        chosen = moe.route(x)  # (7, k)
        ref = []
        for t in range(7):
            runs = [plan.order[s + e * ie: s + (e + 1) * ie] for e in chosen[t].tolist()]
            neurons = torch.cat([plan.order[:s]] + runs)
            g, u = dense.gate_proj.weight[neurons] @ x[t], dense.up_proj.weight[neurons] @ x[t]
            ref.append(dense.down_proj.weight[:, neurons] @ (dense.act_fn(g) * u))
        ref = torch.stack(ref)
        torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-6)  # many tokens: grouped by expert
        torch.testing.assert_close(torch.cat([moe(x[t:t + 1]) for t in range(7)]), ref, rtol=1e-5, atol=1e-6)
