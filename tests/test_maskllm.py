"""MaskLLM: candidate enumeration, prior, Gumbel sampling, training, exact N:M export, bit-exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from sparsecraft.api import prune
from sparsecraft.checkpoint import load_masks, load_packed_state_dict
from sparsecraft.patterns import NM, satisfies
from sparsecraft.training.maskllm import (
    STATE_FILE,
    MaskLLM,
    MaskLLMConfig,
    candidates,
    default_targets,
    hard_mask,
    merge_weights,
    prior_logits,
    save_masked_model,
    soft_mask,
)

VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tokens(n: int, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def magnitude_prior(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return prune(copy.deepcopy(model), "magnitude", None, "2:4", progress=False).masks


@torch.no_grad()
def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    return model(input_ids=ids, labels=ids, use_cache=False).loss.item()


def test_candidates_golden_order() -> None:
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                            dtype=torch.bool)
    assert torch.equal(candidates(NM(2, 4)), expected)
    assert candidates(NM(1, 4)).shape == (4, 4) and candidates(NM(4, 8)).shape == (70, 8)
    assert bool((candidates(NM(4, 8)).sum(1) == 4).all())


def test_prior_logits_golden() -> None:
    keep = torch.tensor([[1, 0, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)  # groups: candidate 1 (1010), candidate 5 (0011)
    logits = prior_logits(keep, NM(2, 4), 3.0)  # strength * (overlap - 1); the complement 0101 shares nothing
    assert logits.shape == (1, 2, 6)
    assert torch.equal(logits[0, 0], torch.tensor([0.0, 3.0, 0.0, 0.0, -3.0, 0.0]))
    assert torch.equal(logits[0, 1], torch.tensor([-3.0, 0.0, 0.0, 0.0, 0.0, 3.0]))
    assert torch.equal(hard_mask(logits, candidates(NM(2, 4))), keep)
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        prior_logits(torch.tensor([[1, 0, 0, 0]], dtype=torch.bool), NM(2, 4), 3.0)


def test_soft_mask_limits() -> None:
    cands = candidates(NM(2, 4))
    logits = torch.tensor([[[0.0, 1.0, 0.0, -1.0, 0.0, -1.0]]])  # (1, 1, 6)
    g = torch.Generator().manual_seed(0)
    cold = soft_mask(logits, cands, scale=1000.0, tau=0.05, generator=g)  # scale dwarfs the noise: one-hot
    assert torch.allclose(cold, torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    hot = soft_mask(logits, cands, scale=1e-6, tau=1e6, generator=g)  # uniform over the 6: every weight 1/2
    assert torch.allclose(hot, torch.full((1, 4), 0.5), atol=1e-5)
    assert torch.allclose(hot.sum(), torch.tensor(2.0))  # any soft mask keeps n of m in expectation


def test_soft_mask_matches_autograd_composition() -> None:
    """The fused Function gives the plain formula's mask and logits gradient (same generator, same noise)."""
    cands = candidates(NM(2, 4))
    logits = torch.randn(8, 5, 6) * 0.02
    weight = torch.randn(8, 20)
    fused, plain = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    m1 = soft_mask(fused, cands, 150.0, 2.0, torch.Generator().manual_seed(3))
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(3)).clamp_(min=1e-20)
    y = torch.softmax((150.0 * plain - torch.log(-torch.log(u))) / 2.0, dim=-1)
    m2 = (y @ cands.float()).flatten(1)
    torch.testing.assert_close(m1, m2)
    (m1 * weight).sum().backward()
    (m2 * weight).sum().backward()
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-4, atol=1e-4)
    assert fused.grad.abs().max() > 1.0  # the gradient is not trivially zero


def test_prior_sets_initial_argmax_and_forward() -> None:
    model = tiny_llama()
    prior = magnitude_prior(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, keep in prior.items():
            reference.get_submodule(fqn).weight.mul_(keep)
    ml = MaskLLM(model, MaskLLMConfig(steps=4), prior=prior)
    assert ml.fqns == default_targets(reference) and len(ml.fqns) == 14
    masks = ml.masks()
    assert all(torch.equal(masks[f], prior[f]) for f in prior)
    ids = tokens(2)
    # eval mode uses the argmax mask: exactly the one-shot masked model
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert not any(p.requires_grad for p in model.parameters() if p.ndim and p.shape[-1] != 6)


def test_training_lowers_loss_and_exports_exact_nm(tmp_path) -> None:
    model = tiny_llama()
    ids = tokens(4, 32)
    ml = MaskLLM(model, MaskLLMConfig(steps=30, lr=0.05, temperature=(1.0, 0.2), scale=(10.0, 20.0),
                                      prior_strength=1.0, weight_reg=1e-4), prior=magnitude_prior(model))
    before = lm_loss(model, ids)
    subnormal = torch.tensor(1e-40)
    records = ml.train([ids])
    after = lm_loss(model, ids)
    assert float(subnormal * 1.0) > 0  # training flushes subnormals to zero, and switches that off again after
    assert len(records) == 30 and all("kept_norm" in r for r in records)
    assert after < before - 0.05, (before, after)
    masks = ml.finalize()
    assert not any(hasattr(model.get_submodule(f), "parametrizations") for f in masks)
    for fqn, keep in masks.items():
        assert satisfies(keep, "2:4") and int(keep.sum()) * 2 == keep.numel()
        weight = model.get_submodule(fqn).weight
        assert int(torch.count_nonzero(weight[~keep])) == 0
    assert abs(lm_loss(model, ids) - after) < 1e-5  # finalize = the eval-mode argmax model
    out = tmp_path / "out"
    save_masked_model(model, None, masks, NM(2, 4), out)
    saved = load_masks(out / "masks.safetensors")
    assert saved.keys() == masks.keys() and all(torch.equal(saved[f], masks[f]) for f in masks)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    packed = load_packed_state_dict(out / "sparse")
    for fqn in masks:
        assert torch.equal(reloaded.get_submodule(fqn).weight, model.get_submodule(fqn).weight)
        assert torch.equal(packed[f"{fqn}.weight"], model.get_submodule(fqn).weight)


class Interrupt(Exception):
    pass


def test_resume_is_bit_exact(tmp_path) -> None:
    config = MaskLLMConfig(steps=6, lr=0.05, temperature=(2.0, 0.5), scale=(10.0, 20.0), weight_reg=1e-4)
    batches = list(tokens(6, 16).split(2))
    base = tiny_llama()
    prior = magnitude_prior(base)

    straight = MaskLLM(copy.deepcopy(base), config, prior=prior)
    straight.train(batches)

    def crash_at_4(rec: dict[str, float]) -> None:
        if rec["step"] == 4:  # step 4 done, last checkpoint after step 3 (every 2 steps: after steps 1 and 3)
            raise Interrupt

    first = MaskLLM(copy.deepcopy(base), config, prior=prior)
    with pytest.raises(Interrupt):
        first.train(batches, checkpoint=tmp_path, checkpoint_every=2, log=crash_at_4)
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG state
    resumed = MaskLLM(copy.deepcopy(base), config, prior=prior)
    resumed.train(batches, checkpoint=tmp_path, checkpoint_every=2)
    assert resumed.records[0]["step"] == 0 and len(resumed.records) == 6
    for fqn in straight.fqns:
        assert torch.equal(resumed.params[fqn].logits, straight.params[fqn].logits), fqn
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in straight.records]
    assert (tmp_path / STATE_FILE).is_file()
    other = MaskLLM(copy.deepcopy(base), MaskLLMConfig(steps=7), prior=prior)
    with pytest.raises(ValueError, match="other settings"):
        other.train(batches, checkpoint=tmp_path)


def test_merge_weights_and_validation() -> None:
    dense, pruned = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.0, 2.5, 0.0, 4.5]])
    keep = torch.tensor([[False, True, False, True]])
    assert torch.equal(merge_weights(dense, pruned, keep), torch.tensor([[1.0, 2.5, 3.0, 4.5]]))
    with pytest.raises(ValueError, match="NM"):
        MaskLLMConfig(pattern="2:4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not targets"):
        MaskLLM(tiny_llama(), MaskLLMConfig(), prior={"lm_head": torch.ones(VOCAB, 32, dtype=torch.bool)})
