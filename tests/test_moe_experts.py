"""Expert removal (REAP) and merging: golden scores, exact no-op removals, plain-transformers reloads on tiny MoEs."""

import subprocess
import sys

import pytest
import torch

from test_moe_models import MOE_ARCHS, VOCAB, tiny_moe
from sparsecraft.moe.experts import (ExpertConfig, cluster_experts, expert_statistics, keep_top, merge_weights,
                                     reap_contributions, reduce_experts, remove_experts_)
from sparsecraft.moe.fused import find_fused_experts


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def test_reap_golden():
    index = torch.tensor([[0, 1], [1, 2], [0, 2], [4, 1]])  # slot index 4 = a masked slot (DeepSeek groups): ignored
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    norms = torch.tensor([[2.0, 10.0], [1.0, 4.0], [4.0, 2.0], [7.0, 5.0]])
    sums, counts = reap_contributions(index, weights, norms, num_experts=4)
    # e0: .7*2 + .5*4 = 3.4; e1: .3*10 + .6*1 + .1*5 = 4.1; e2: .4*4 + .5*2 = 2.6; e3: never routed
    torch.testing.assert_close(sums, torch.tensor([3.4, 4.1, 2.6, 0.0], dtype=torch.float64))
    assert counts.tolist() == [2, 3, 2, 0]
    scores = sums / counts.clamp(min=1)  # 1.7, 1.3667, 1.3, 0
    assert keep_top(scores, 2) == [0, 1] and keep_top(scores, 3) == [0, 1, 2]
    assert keep_top(torch.tensor([1.0, 2.0, 2.0, 0.5]), 1) == [1]  # tie: lower index


def test_statistics_match_a_plain_reference(tokens):
    """Scores and counts from the hooks equal a by-hand recomputation of Mixtral's block 0 routing."""
    model = tiny_moe("mixtral")
    block = model.model.layers[0].mlp
    seen = []
    handle = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    stats = expert_statistics(model, tokens, batch_size=2)["model.layers.0.mlp.experts"]
    handle.remove()
    x = torch.cat(seen)  # (64, H): the block inputs of both batches
    probs = (x @ block.gate.weight.T).softmax(-1)
    top, index = probs.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    E, inter = 4, 32
    ref_sum, ref_count = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.long)
    with torch.no_grad():
        for n in range(x.shape[0]):
            for j in range(2):
                e = int(index[n, j])
                w = block.experts.gate_up_proj[e]
                h = torch.nn.functional.silu(w[:inter] @ x[n]) * (w[inter:] @ x[n])
                ref_sum[e] += float(top[n, j]) * float((block.experts.down_proj[e] @ h).norm())
                ref_count[e] += 1
    assert stats.routed.tolist() == ref_count.tolist() and int(stats.routed.sum()) == 2 * tokens.numel()
    torch.testing.assert_close(stats.scores, ref_sum / ref_count.clamp(min=1), rtol=1e-5, atol=1e-6)
    assert sum(s.shape[0] for s in stats.sample) == 64 and stats.outputs(block.experts).shape == (4, 64, 32)


def test_cluster_and_merge_golden():
    v, w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.randn(5, 3)
    outputs = torch.stack([v, w, 2 * v, w + 0.01 * v])  # (E=4, n=5, H=3): 0 ~ 2 (same direction), 1 ~ 3
    assert cluster_experts(outputs, 2) == [[0, 2], [1, 3]]
    assert cluster_experts(outputs, 4) == [[0], [1], [2], [3]]
    assert cluster_experts(outputs, 1) == [[0, 1, 2, 3]]
    stack = torch.tensor([[1.0], [4.0], [10.0]])
    assert merge_weights(stack, [[0, 1], [2]], torch.tensor([1.0, 3.0, 0.0])).tolist() == [[3.25], [10.0]]
    assert merge_weights(stack, [[0, 1], [2]], torch.tensor([0.0, 0.0, 5.0])).tolist() == [[2.5], [10.0]]  # unused


def test_removing_a_never_picked_expert_changes_nothing(tokens):
    """DeepSeek-V3 routes on sigmoid(logit) + e_score_correction_bias: a -1e4 bias means expert 3 is never picked,
    so removing it is exact on ANY input, and REAP scores it 0 so it is the one removed."""
    model = tiny_moe("deepseek_v3")
    for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias[3] = -1e4
    fresh = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(fresh).logits
    result = reduce_experts(model, tokens, ExpertConfig("prune", keep=3))
    assert result.scores["model.layers.1.mlp.experts"][3] == 0.0
    assert result.routed_tokens["model.layers.1.mlp.experts"][3] == 0
    assert result.groups["model.layers.1.mlp.experts"] == [[0], [1], [2]]
    assert model.config.n_routed_experts == 3 and model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 3
    with torch.no_grad():
        torch.testing.assert_close(model(fresh).logits, ref, rtol=1e-5, atol=1e-5)


def _reload(model, folder):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("action", ["prune", "merge"])
def test_reduced_model_reloads_with_plain_transformers(arch, action, tokens, tmp_path):
    model = tiny_moe(arch)
    before = sum(p.numel() for p in model.parameters())
    result = reduce_experts(model, tokens, ExpertConfig(action, keep=2))
    for fqn, module in find_fused_experts(model).items():
        assert module.gate_up_proj.shape[0] == 2 and module.down_proj.shape[0] == 2
        members = [e for g in result.groups[fqn] for e in g]
        assert sorted(members) == [0, 1, 2, 3] if action == "merge" else [len(g) for g in result.groups[fqn]] == [1, 1]
    reloaded = _reload(model, tmp_path)
    assert sum(p.numel() for p in reloaded.parameters()) < before
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_merged_weights_and_router_rows(tokens):
    model = tiny_moe("mixtral")
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = expert_statistics(model, tokens)["model.layers.1.mlp.experts"]
    result = reduce_experts(model, tokens, ExpertConfig("merge", keep=2))
    groups = result.groups["model.layers.1.mlp.experts"]
    freq = stats.weight_sum
    for c, g in enumerate(groups):
        w = freq[g] / freq[g].sum()
        want = sum(float(w[i]) * orig["model.layers.1.mlp.experts.down_proj"][e] for i, e in enumerate(g))
        torch.testing.assert_close(model.model.layers[1].mlp.experts.down_proj[c], want)
        lead = max(g, key=lambda e: float(freq[e]))
        assert torch.equal(model.model.layers[1].mlp.gate.weight[c], orig["model.layers.1.mlp.gate.weight"][lead])


def test_reload_in_a_process_without_sparsecraft(tokens, tmp_path):
    model = tiny_moe("qwen3_moe")
    reduce_experts(model, tokens, ExpertConfig("prune", keep=2))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.save((tokens, model(tokens).logits), tmp_path / "want.pt")
    code = ("import sys, torch, transformers; t, want = torch.load(sys.argv[1] + '/want.pt'); "
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
            "assert m.config.num_experts == 2, m.config.num_experts; "
            "torch.testing.assert_close(m(t).logits, want, rtol=0, atol=0); "
            "assert not any(k.startswith('sparsecraft') for k in sys.modules); print('ok')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-800:]


def test_bad_inputs(tokens):
    from conftest import tiny_model

    with pytest.raises(ValueError, match="no fused MoE experts"):
        reduce_experts(tiny_model("llama"), tokens, ExpertConfig("prune", keep=1))
    with pytest.raises(ValueError, match="num_experts_per_tok=2"):
        reduce_experts(tiny_moe("mixtral"), tokens, ExpertConfig("prune", keep=1))
    with pytest.raises(ValueError, match="num_experts_per_tok=2"):
        reduce_experts(tiny_moe("mixtral"), tokens, ExpertConfig("merge", keep=5))
    with pytest.raises(ValueError, match="sorted, unique"):
        remove_experts_(tiny_moe("mixtral"), {f"model.layers.{i}.mlp.experts": [2, 0] for i in range(2)})
    with pytest.raises(ValueError, match="action must be"):
        ExpertConfig("drop", keep=2)
    with pytest.raises(ValueError, match="keep must be"):
        ExpertConfig("prune", keep=0)
