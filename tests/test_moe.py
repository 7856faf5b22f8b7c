"""MoE pruning: fused experts pruned per expert through the ordinary engine (contract matrix on tiny MoE models)."""

import copy

import pytest
import torch

from test_moe_models import MOE_ARCHS, VOCAB, tiny_moe
from sparsecraft.api import prune
from sparsecraft.engine.hooks import hook_count
from sparsecraft.moe import MoEPruneResult, UnfusedExperts, find_fused_experts, unfused_experts
from sparsecraft.patterns import expected_zeros, parse_pattern, satisfies

CASES = [(a, m, p, s) for a in MOE_ARCHS for m, p, s in (
    ("magnitude", "unstructured", 0.5), ("random", "2:4", None), ("wanda", "4x4", 0.5), ("wanda", "2:4", None),
    ("sparsegpt", "unstructured", 0.6), ("sparsegpt", "2:4", None))]


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))  # (nsamples, seqlen)


def expert_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fqn of each expert layer -> its (out, in) weight, read from the FUSED tensors."""
    out = {}
    for fqn, m in find_fused_experts(model).items():
        inter = m.gate_up_proj.shape[1] // 2
        for e in range(m.gate_up_proj.shape[0]):
            out[f"{fqn}.{e}.gate_proj"] = m.gate_up_proj[e, :inter]
            out[f"{fqn}.{e}.up_proj"] = m.gate_up_proj[e, inter:]
            out[f"{fqn}.{e}.down_proj"] = m.down_proj[e]
    return out


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_unfused_model_computes_the_same_logits(arch, tokens):
    model = tiny_moe(arch)
    with torch.no_grad():
        ref = model(tokens).logits
        with unfused_experts(model) as counts:
            assert not find_fused_experts(model) and counts.modules
            unfused = model(tokens).logits
        again = model(tokens).logits
    torch.testing.assert_close(unfused, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, ref)  # fused back: nothing changed
    assert not any(isinstance(m, UnfusedExperts) for m in model.modules())


@pytest.mark.parametrize("arch,method,pattern,sparsity", CASES)
def test_moe_contract(arch, method, pattern, sparsity, tokens):
    model = tiny_moe(arch)
    twin = copy.deepcopy(model)
    hooks = hook_count(model)
    router = {n: p.clone() for n, p in model.named_parameters() if "gate.weight" in n or "router" in n}
    result = prune(model, method, sparsity, pattern, tokens, progress=False, seed=3)
    assert isinstance(result, MoEPruneResult) and hook_count(model) == hooks
    assert not any(isinstance(m, UnfusedExperts) for m in model.modules())
    experts = expert_weights(model)
    assert set(experts) <= set(result.masks)  # every expert layer of every MoE block was pruned
    p = parse_pattern(pattern)
    modules = dict(model.named_modules())
    for fqn, keep in result.masks.items():
        w = experts[fqn] if fqn in experts else modules[fqn].weight
        assert keep.shape == w.shape
        assert int((~keep).sum()) == expected_zeros(tuple(w.shape), sparsity, p), fqn  # exact, per expert
        assert satisfies(keep, p) and (w[~keep] == 0).all(), fqn
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in router.items())  # routers untouched
    assert not any("gate" == f.rsplit(".", 1)[-1] or f.endswith("shared_expert_gate") for f in result.masks)
    # every routed token of every batch was counted, k per token
    for fqn, routed in result.routed_tokens.items():
        assert sum(routed) == tokens.numel() * 2, fqn
    assert 0 < result.sparsity_all < result.sparsity
    logits = model(tokens).logits
    assert torch.isfinite(logits).all()
    again = prune(twin, method, sparsity, pattern, tokens, progress=False, seed=3)
    assert all(torch.equal(result.masks[f], again.masks[f]) for f in result.masks)


def test_routed_statistics_see_only_routed_tokens(tokens):
    """Wanda's input norms of an expert come from its routed tokens ("routed") or from all tokens ("all")."""
    seen = {}
    for mode in ("routed", "all"):
        model = tiny_moe("mixtral")
        with unfused_experts(model, calibrate=mode) as counts:
            result = prune(model, "wanda", 0.5, "unstructured", tokens, progress=False)
        assert isinstance(result, MoEPruneResult) and result.calibrate == mode
        seen[mode] = result.seen_tokens["model.layers.0.mlp.experts"]
        routed = result.routed_tokens["model.layers.0.mlp.experts"]
        assert counts.routed()["model.layers.0.mlp.experts"] == routed
    assert seen["all"] == [tokens.numel()] * 4  # every expert saw all 64 tokens
    assert seen["routed"] == routed and sum(routed) == 2 * tokens.numel()


class NeverExpert3(torch.nn.Module):
    """A top-2 softmax router that never picks expert 3."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(hidden, self.weight)  # (N, E)
        logits[:, 3] = float("-inf")
        top, index = logits.softmax(-1).topk(2, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index


def test_dead_expert_falls_back_to_the_whole_batch(tokens):
    model = tiny_moe("mixtral")
    for layer in model.model.layers:
        layer.mlp.gate = NeverExpert3(layer.mlp.gate.weight)
    result = prune(model, "sparsegpt", 0.5, "unstructured", tokens, progress=False)
    assert result.routed_tokens["model.layers.1.mlp.experts"][3] == 0
    assert result.fallback_batches["model.layers.1.mlp.experts"][3] == 1  # one batch of 4 windows
    assert result.seen_tokens["model.layers.1.mlp.experts"][3] == tokens.numel()
    assert int((~result.masks["model.layers.1.mlp.experts.3.down_proj"]).sum()) == 32 * 32 // 2


def test_dense_model_is_not_wrapped(tokens):
    from conftest import tiny_model

    result = prune(tiny_model("llama"), "magnitude", 0.5, "unstructured", tokens, progress=False)
    assert type(result).__name__ == "PruneResult"


def test_little_reachable_warns(tokens):
    model = tiny_moe("mixtral")
    with pytest.warns(UserWarning, match="sparsity over all parameters"):
        prune(model, "magnitude", 0.5, "unstructured", tokens, progress=False, include=["*.experts.0.*"])
