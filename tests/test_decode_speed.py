"""Greedy decoding as the speed row measures it: the same tokens as transformers' generate, and a packed copy that
decodes exactly what the masked dense model decodes."""

from __future__ import annotations

import torch

from conftest import VOCAB, tiny_model
from sparsecraft import prune
from sparsecraft.evaluate import decode_speed, greedy_decode


def test_greedy_decode_equals_generate():
    model = tiny_model("llama")
    ids = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    got, rate = greedy_decode(model, ids, 7)
    want = model.generate(ids, max_new_tokens=7, do_sample=False, min_new_tokens=7)[:, ids.shape[1]:]
    assert torch.equal(got, want) and rate > 0


def test_decode_speed_packs_a_copy_that_decodes_the_same_tokens():
    model = tiny_model("llama")
    calib = torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    result = prune(model, "wanda", 0.5, "unstructured", calib, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    speed = decode_speed(model, result.masks, "unstructured", calib[:1, :8], new_tokens=6, rounds=1)
    assert speed["same_tokens"] == 1.0 and speed["dense_tok_s"] > 0 and speed["packed_tok_s"] > 0
    assert speed["speedup"] == speed["packed_tok_s"] / speed["dense_tok_s"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model itself is untouched
    assert all(type(model.get_submodule(f)) is torch.nn.Linear for f in result.masks)  # its own layers back
