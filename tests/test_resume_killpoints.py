"""Every kill point of ResumeState.save: a failure injected after each write (block file, hidden states, progress
commit, unlink of the superseded hidden file) and then a resume gives exactly the uninterrupted run."""

from __future__ import annotations

import pytest
import torch

import sparsecraft.engine.resume as resume_mod
from conftest import VOCAB, tiny_model
from sparsecraft import prune
from sparsecraft.engine.resume import ResumeState

FINGERPRINT = {"settings": {"method": "sparsegpt"}}


class Killed(BaseException):  # like a kill: not turned into an error by the engine
    pass


def run(state: ResumeState | None, calib: torch.Tensor):
    model = tiny_model("llama")
    result = prune(model, "sparsegpt", 0.5, "unstructured", calib, progress=False, resume=state)
    return model, result


@pytest.fixture(scope="module")
def calib_ids() -> torch.Tensor:
    return torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(calib_ids):
    return run(None, calib_ids)


def writes_per_block() -> list[str]:
    return ["block", "hidden", "progress", "unlink"]


@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize("point", writes_per_block())
def test_kill_after_each_write_then_resume_equals_uninterrupted(tmp_path, monkeypatch, calib_ids, reference,
                                                                block, point):
    calls = {"n": 0}
    target = 4 * block + writes_per_block().index(point)  # the write (0-based) after which the process dies
    real_tensors, real_bytes, real_unlink = resume_mod.atomic_save_tensors, resume_mod.atomic_write_bytes, \
        resume_mod.Path.unlink

    def count() -> None:
        calls["n"] += 1
        if calls["n"] - 1 == target:
            raise Killed(point)

    def tensors(*a, **k):
        real_tensors(*a, **k)
        count()

    def write_bytes(*a, **k):
        real_bytes(*a, **k)
        count()

    def unlink(self, *a, **k):
        real_unlink(self, *a, **k)
        if self.name.startswith("hidden_"):
            count()

    monkeypatch.setattr(resume_mod, "atomic_save_tensors", tensors)
    monkeypatch.setattr(resume_mod, "atomic_write_bytes", write_bytes)
    monkeypatch.setattr(resume_mod.Path, "unlink", unlink)
    with pytest.raises(Killed):
        run(ResumeState(tmp_path / "state", FINGERPRINT), calib_ids)
    monkeypatch.undo()
    model, result = run(ResumeState(tmp_path / "state", FINGERPRINT), calib_ids)
    ref_model, ref_result = reference
    assert set(result.masks) == set(ref_result.masks)
    assert all(torch.equal(result.masks[f], ref_result.masks[f]) for f in ref_result.masks)
    ref_state = ref_model.state_dict()
    assert all(torch.equal(t, ref_state[k]) for k, t in model.state_dict().items())


def test_a_block_file_of_another_block_is_refused(tmp_path, calib_ids):
    state = ResumeState(tmp_path / "s", FINGERPRINT)
    original = ResumeState.save

    def die_after_block_1(self, i, result, calls):
        original(self, i, result, calls)
        if i == 1:
            raise Killed

    ResumeState.save = die_after_block_1
    try:
        with pytest.raises(Killed):
            run(state, calib_ids)
    finally:
        ResumeState.save = original
    folder = tmp_path / "s"
    (folder / "block_0.safetensors").write_bytes((folder / "block_1.safetensors").read_bytes())  # a mixed state
    with pytest.raises(ValueError, match="mixes blocks"):
        run(ResumeState(folder, FINGERPRINT), calib_ids)
