"""Distillation after pruning with the masks fixed (structured/distill.py ``keep=``): pruned weights stay exactly 0
through Trainer steps, kept weights train, the hooks and buffers come off; the unmasked run moves the same weights
(so the masked assertion can fail); callbacks see every step; bad settings are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from transformers import TrainerCallback

from sparsecraft.engine.blocks import find_blocks
from sparsecraft.structured.distill import DistillConfig, distill
from sparsecraft.training.masks import KEEP_BUFFER


def _masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    fqn, blocks = find_blocks(model)
    g = torch.Generator().manual_seed(3)
    return {f"{fqn}.{i}.{n}": torch.rand(m.weight.shape, generator=g) < 0.5
            for i, b in enumerate(blocks) for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)}


class Steps(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.seen.append(state.global_step)


def _run(tmp_path, keep):
    teacher, student = tiny_model("llama", seed=1), tiny_model("llama", seed=0)
    with torch.no_grad():
        for fqn, k in (keep or {}).items():
            student.get_submodule(fqn).weight.masked_fill_(~k, 0.0)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    windows = torch.randint(2, VOCAB, (8, 16), generator=torch.Generator().manual_seed(2))
    steps = Steps()
    info = distill(student, teacher, windows, DistillConfig(tokens=3 * 4 * 16, seqlen=16, lr=1e-2), tmp_path,
                   keep=keep, callbacks=[steps])
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher is left as it was (a copy may train)
    return student, before, info, steps.seen


def test_masked_distill_keeps_zeros_and_trains_the_rest(tmp_path):
    keep = _masks(tiny_model("llama"))
    student, before, info, seen = _run(tmp_path, keep)
    assert info["steps"] == 3 and seen == [1, 2, 3]
    for fqn, k in keep.items():
        w = student.get_submodule(fqn).weight
        assert torch.equal(w[~k], torch.zeros(int((~k).sum())))  # pruned: exactly 0 after 3 AdamW steps
        assert not torch.equal(w[k], before[f"{fqn}.weight"][k])  # kept: trained
        assert not hasattr(student.get_submodule(fqn), KEEP_BUFFER)  # buffers off again
    assert not any(KEEP_BUFFER in k for k in student.state_dict())
    assert all(not p._backward_hooks for p in student.parameters())  # no gradient hooks left behind


def test_unmasked_distill_moves_the_same_weights(tmp_path):
    keep = _masks(tiny_model("llama"))
    student, _, _, _ = _run(tmp_path, None)  # the control: without keep, the would-be pruned weights train
    fqn, k = next(iter(keep.items()))
    assert student.get_submodule(fqn).weight[~k].abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokens=10, seqlen=16), "below one batch"),
    (dict(tokens=64, seqlen=16, lr=0.0), "must be > 0"),
    (dict(tokens=64, seqlen=16, temperature=-1.0), "must be > 0"),
])
def test_bad_distill_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)
