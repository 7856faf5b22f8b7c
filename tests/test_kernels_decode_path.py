"""choose_decode_paths_: per-shape kernel-or-dense decisions, cached per machine, and the dense decode path's
outputs equal to the kernel's and to dense F.linear."""

import json

import torch
from torch import nn

from sparsecraft.modules import SparseLinear, choose_decode_paths_, sparsify_model_
from sparsecraft.modules.sparse_linear import _machine, _shape_key
from sparsecraft.patterns import topk_mask


def _model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64, bias=False), nn.Linear(64, 96))  # 0 and 2 share a shape
    masks = {str(i): topk_mask(model[i].weight.detach().abs(), 0.5, "unstructured") for i in range(3)}
    return model, masks


def test_cached_decision_is_applied_per_shape(tmp_path):
    model, masks = _model()
    x = torch.randn(3, 64)
    with torch.no_grad():
        for i, keep in masks.items():
            model[int(i)].weight.mul_(keep)
        want = model(x)
    sparsify_model_(model, masks, "unstructured")
    cache = tmp_path / "paths.json"
    cache.write_text(json.dumps({f"{_machine()}|{_shape_key(model[0])}": "dense",
                                 f"{_machine()}|{_shape_key(model[1])}": "kernel"}))
    chosen = choose_decode_paths_(model, cache=cache)
    assert chosen == {"0": "dense", "1": "kernel", "2": "dense"}  # from the cache, no timing
    assert torch.equal(model[0].decode_weight, model[0].dense_weight()) and model[1].decode_weight is None
    assert "decode=dense" in repr(model[2]) and "decode=dense" not in repr(model[1])
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        model[0].decode_weight = None  # the kernel gives the same numbers
        torch.testing.assert_close(model[0](x), nn.functional.linear(x, model[0].dense_weight(), model[0].bias),
                                   rtol=1e-5, atol=1e-5)


def test_measured_decisions_are_cached_and_reused(tmp_path):
    model, masks = _model()
    sparsify_model_(model, masks, "unstructured")
    cache = tmp_path / "sub" / "paths.json"
    chosen = choose_decode_paths_(model, rounds=1, cache=cache)
    saved = json.loads(cache.read_text())
    assert len(saved) == 2 and set(saved.values()) <= {"kernel", "dense"}  # two shapes measured
    assert chosen["0"] == chosen["2"] == saved[f"{_machine()}|{_shape_key(model[0])}"]
    flipped = {k: "dense" if v == "kernel" else "kernel" for k, v in saved.items()}
    cache.write_text(json.dumps(flipped))
    again = choose_decode_paths_(model, cache=cache)  # the cache wins over a new measurement
    assert all(again[f] != chosen[f] for f in chosen)
    assert all((m.decode_weight is not None) == (again[f] == "dense")
               for f, m in model.named_modules() if isinstance(m, SparseLinear))


def test_a_malformed_cache_is_measured_again_and_rewritten(tmp_path):
    model, masks = _model()
    sparsify_model_(model, masks, "unstructured")
    cache = tmp_path / "paths.json"
    for bad in ("{not json", json.dumps(["dense"]), json.dumps({f"{_machine()}|{_shape_key(model[0])}": "fast"})):
        cache.write_text(bad)
        chosen = choose_decode_paths_(model, rounds=1, cache=cache)
        saved = json.loads(cache.read_text())
        assert len(saved) == 2 and set(saved.values()) <= {"kernel", "dense"}
        assert chosen["0"] == saved[f"{_machine()}|{_shape_key(model[0])}"]
