"""Pruned checkpoints: a Hugging Face folder that loads as is, the keep-masks, and the same weights sparse on disk.

Packed file (``sparse/model.safetensors``): every pruned weight ``W`` of module ``fqn`` is stored as the tensors of
its packed format (see docs/formats.md) under ``"{fqn}.weight@{name}"``; every other state-dict entry is stored
dense under its own key. The safetensors metadata ``sparsecraft`` holds JSON: which weights are packed, which were
transposed to (out, in) first (GPT-2 Conv1D) and which keys alias a tied tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sparsecraft import formats
from sparsecraft.engine.blocks import is_conv1d
from sparsecraft.io import atomic_save_tensors
from sparsecraft.patterns import Pattern

PACKED_FILE = "model.safetensors"


def save_masks(masks: dict[str, torch.Tensor], path: Path) -> None:
    atomic_save_tensors({fqn: m.bool() for fqn, m in masks.items()}, path)


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    try:
        return {k: v.bool() for k, v in load_file(str(path)).items()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"cannot read masks from {path} ({e}); the file is missing or corrupt") from None


def save_packed(model: nn.Module, masks: dict[str, torch.Tensor], pattern: Pattern, path: Path) -> dict[str, int]:
    """Write the packed checkpoint; return {"dense_bytes", "packed_bytes"} of the pruned weights alone."""
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    meta = {"packed": {}, "aliases": {}, "pattern": str(pattern)}
    seen: dict[int, str] = {}
    dense_bytes = packed_bytes = 0
    for key, value in model.state_dict().items():
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:  # tied weights (e.g. embeddings and LM head) are stored once
            meta["aliases"][key] = seen[ptr]
            continue
        seen[ptr] = key
        fqn = key.removesuffix(".weight")
        if key.endswith(".weight") and fqn in masks:
            transposed = is_conv1d(modules[fqn])
            w = value.T if transposed else value
            keep = masks[fqn].T if transposed else masks[fqn]
            packed = formats.pack(w, keep, pattern)
            for name, t in packed.tensors().items():
                tensors[f"{key}@{name}"] = t
            meta["packed"][key] = {"transposed": transposed}
            dense_bytes += value.numel() * value.element_size()
            packed_bytes += packed.nbytes
        else:
            tensors[key] = value.detach().cpu()
    atomic_save_tensors(tensors, path, metadata={"sparsecraft": json.dumps(meta)})
    return {"dense_bytes": dense_bytes, "packed_bytes": packed_bytes}


def load_packed_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a packed checkpoint back to a dense state dict, bit-exactly."""
    path = Path(path)
    if path.is_dir():
        path = path / PACKED_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("sparsecraft", "null"))
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"cannot read packed checkpoint {path} ({e}); the file is missing or corrupt") from None
    if meta is None:
        raise ValueError(f"{path} is not a sparsecraft packed checkpoint (no 'sparsecraft' metadata)")
    state = {k: v for k, v in raw.items() if "@" not in k}
    for key, info in meta["packed"].items():
        parts = {k.split("@", 1)[1]: v for k, v in raw.items() if k.startswith(key + "@")}
        dense = formats.from_tensors(parts).to_dense()
        state[key] = dense.T.contiguous() if info["transposed"] else dense
    for key, target in meta["aliases"].items():
        state[key] = state[target]
    return state
