"""Child process of tests/test_packed_fuzz.py: load every mutated packed file given on the command line into a fresh
tiny model and print one JSON line per file: {"file", "outcome": "ok" | "error", "message", "same"}. A crash (signal)
kills only this process; the parent sees which file was being loaded from the last line printed."""

from __future__ import annotations

import json
import sys

import torch

from sparsecraft.checkpoint import load_packed_model_, load_packed_state_dict
from sparsecraft.modules import SparseLinear

sys.path.insert(0, sys.argv[1])
from test_packed_fuzz import make_model  # noqa: E402  (the same tiny model as the parent)

reference = torch.load(sys.argv[2], weights_only=True)  # {key: dense weight} of the intact file
x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
for path in sys.argv[3:]:
    print(json.dumps({"file": path, "outcome": "start"}), flush=True)
    model = make_model()
    try:
        load_packed_model_(model, path)
        dense = load_packed_state_dict(path)
        y = model(x)  # the kernels run on whatever was accepted
        weights = {f"{f}.weight": m.dense_weight() for f, m in model.named_modules() if isinstance(m, SparseLinear)}
        state = {**dense, **weights}
        same = all(torch.equal(state[k], v) for k, v in reference.items()) and bool(torch.isfinite(y).all())
        print(json.dumps({"file": path, "outcome": "ok", "same": same}), flush=True)
    except ValueError as e:
        print(json.dumps({"file": path, "outcome": "error", "message": str(e)}), flush=True)
    except Exception as e:  # any other exception type is a defect: the parent fails on it
        print(json.dumps({"file": path, "outcome": "crash", "message": f"{type(e).__name__}: {e}"}), flush=True)
