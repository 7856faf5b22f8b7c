"""Pruned checkpoints: the keep-masks, and the pruned weights sparse on disk (one writer, one reader).

Packed file (``sparse/model.safetensors``): every pruned weight ``W`` of module ``fqn`` is stored as the tensors of
its packed format (see docs/formats.md) under ``"{fqn}.weight@{name}"``; every other state-dict entry is stored
dense under its own key. The safetensors metadata ``sparsecraft`` holds JSON: which weights are packed, which were
transposed to (out, in) first (GPT-2 Conv1D) and which keys alias a tied tensor.

- ``save_packed(model, masks, pattern, path)`` writes it from a dense model and its masks, or from a model whose
  pruned layers are already ``SparseLinear`` (``masks`` may then be empty): straight from the kernel layout.
- ``load_packed_model_(model, path)`` loads it into a model of the same architecture, building each ``SparseLinear``
  from the packed tensors (no dense copy of a pruned weight); every tensor is checked against the model first.
- ``load_packed_state_dict(path)`` reads it back to a dense state dict, bit-exactly (inspect, tests).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch import nn

from sparsecraft import formats
from sparsecraft.engine.blocks import is_conv1d
from sparsecraft.formats.masks import MASKS_META, decode_mask, load_masks, save_masks  # noqa: F401 (re-exported)
from sparsecraft.io import atomic_save_tensors
from sparsecraft.modules import SparseLinear, swap_module_
from sparsecraft.patterns import Pattern

PACKED_FILE = "model.safetensors"


def _tensor_key(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def packed_tensors(model: nn.Module, masks: dict[str, torch.Tensor], pattern: Pattern | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, int]]:
    """-> (tensors, metadata, {"dense_bytes", "packed_bytes"} of the pruned weights alone)."""
    modules = dict(model.named_modules())
    sparse = {fqn: m for fqn, m in modules.items() if isinstance(m, SparseLinear)}
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"packed": {}, "aliases": {}, "pattern": None if pattern is None else str(pattern)}
    sizes = {"dense_bytes": 0, "packed_bytes": 0}

    def put_packed(key: str, packed: formats.AnyPacked, transposed: bool, dense_bytes: int) -> None:
        for name, t in packed.tensors().items():
            tensors[f"{key}@{name}"] = t.contiguous()
        meta["packed"][key] = {"transposed": transposed}
        meta["pattern"] = meta["pattern"] or str(formats.pattern_of(packed))
        sizes["dense_bytes"] += dense_bytes
        sizes["packed_bytes"] += packed.nbytes

    for fqn, module in sparse.items():
        put_packed(f"{fqn}.weight", module.packed(), False,
                   module.in_features * module.out_features * module.values.element_size())
        if module.bias is not None:
            tensors[f"{fqn}.bias"] = module.bias.detach().cpu().contiguous()
    skip = tuple(f"{fqn}." for fqn in sparse)
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        if key.startswith(skip):
            continue
        ident = _tensor_key(value)
        if ident in seen and value.numel() > 0:  # tied weights (e.g. embeddings and LM head) are stored once
            meta["aliases"][key] = seen[ident]
            continue
        seen[ident] = key
        fqn = key.removesuffix(".weight")
        if key.endswith(".weight") and fqn in masks:
            transposed = is_conv1d(modules[fqn])
            w = value.detach().cpu()
            keep = masks[fqn].cpu()
            packed = formats.pack(w.T if transposed else w, keep.T if transposed else keep, pattern)
            put_packed(key, packed, transposed, value.numel() * value.element_size())
        else:
            tensors[key] = value.detach().cpu().contiguous()
    return tensors, meta, sizes


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def save_packed(model: nn.Module, masks: dict[str, torch.Tensor], pattern: Pattern | None, path: Path
                ) -> dict[str, int]:
    """Write the packed checkpoint atomically, with a sha256 of every tensor in the metadata; return
    {"dense_bytes", "packed_bytes"} of the pruned weights."""
    tensors, meta, sizes = packed_tensors(model, masks, pattern)
    meta["sha256"] = {key: tensor_digest(t) for key, t in tensors.items()}
    atomic_save_tensors(tensors, Path(path), metadata={"sparsecraft": json.dumps(meta)})
    return sizes


def _file(path: str | Path) -> Path:
    path = Path(path)
    return path / PACKED_FILE if path.is_dir() else path


class PackedFile:
    """An open packed checkpoint: the metadata is parsed and checked against every key of the file once, then
    ``read(select)`` reads the selected tensors (each checked against its recorded checksum), as often as needed
    (the HF loader reads one layer at a time). Use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = _file(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
            text = (self._file.metadata() or {}).get("sparsecraft")
            self.names = set(self._file.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read packed checkpoint {self.path} ({e}); the file is missing or "
                             f"corrupt") from None
        self.meta = self._check_meta(text)

    def __enter__(self) -> PackedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file = None  # safe_open has no close(); dropping the handle unmaps the file

    def _check_meta(self, text: str | None) -> dict[str, Any]:
        path, names = self.path, self.names
        if text is None:
            raise ValueError(f"{path} is not a sparsecraft packed checkpoint (no 'sparsecraft' metadata)")
        try:
            meta = json.loads(text)
        except json.JSONDecodeError:
            meta = None
        packed, aliases = (meta.get("packed"), meta.get("aliases")) if isinstance(meta, dict) else (None, None)
        if not (isinstance(packed, dict) and isinstance(aliases, dict)
                and all(isinstance(v, dict) and isinstance(v.get("transposed", False), bool) for v in packed.values())
                and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items())):
            raise ValueError(f"{path}: the 'sparsecraft' metadata is malformed (needs 'packed' and 'aliases' maps); "
                             f"the file is corrupt or was not written by sparsecraft")
        digests = meta.get("sha256")
        if digests is not None:  # files written since 0.2: every tensor is covered
            missing = sorted(set(digests) - names) if isinstance(digests, dict) else ["(sha256 is not a map)"]
            if missing:
                raise ValueError(f"{path}: tensors {missing[:3]} have recorded checksums but are not in the file; "
                                 f"the file is corrupt or was altered (rebuild it with `sparsecraft pack`)")
        stray = sorted(k for k in names if "@" in k and k.split("@", 1)[0] not in packed)
        if stray:
            raise ValueError(f"{path}: tensors {stray[:3]} belong to no packed weight of the metadata; the file is "
                             f"corrupt")
        for key, target in aliases.items():
            if key in names or key in packed or key in aliases.values():
                raise ValueError(f"{path}: alias {key} -> {target} names a key that is itself stored; the file is "
                                 f"corrupt")
            if target not in names and target not in packed:
                raise ValueError(f"{path}: alias {key} -> {target} points to no stored tensor; the file is corrupt")
        return meta

    def read(self, select: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        """The tensors whose key ``select(key)`` accepts (all by default), each matched against its checksum."""
        try:
            raw = {k: self._file.get_tensor(k) for k in sorted(self.names) if select is None or select(k)}
        except Exception as e:
            raise ValueError(f"cannot read packed checkpoint {self.path} ({e}); the file is corrupt") from None
        digests = self.meta.get("sha256")
        if digests is not None:
            bad = sorted(k for k in raw if digests.get(k) != tensor_digest(raw[k]))
            if bad:
                raise ValueError(f"{self.path}: tensors {bad[:3]} do not match the checksums recorded when the file "
                                 f"was written; the file is corrupt or was altered (rebuild it with `sparsecraft "
                                 f"pack`)")
        return raw


def read_packed_file(path: str | Path, select: Callable[[str], bool] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (raw tensors, validated metadata) of a packed checkpoint file (or a folder holding one). ``select(key)``
    limits which tensors are read into memory (the metadata is still checked against every key of the file)."""
    with PackedFile(path) as f:
        return f.read(select), f.meta


def packed_parts(raw: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """The tensors of the packed weight ``key`` (``"{key}@{name}"`` entries) -> {name: tensor}."""
    return {k.split("@", 1)[1]: v for k, v in raw.items() if k.startswith(key + "@")}


def check_bias(path: Path, fqn: str, bias: torch.Tensor | None, has_bias: bool, rows: int) -> None:
    """A packed Linear's bias from the file against the model's layer: present iff the layer has one, float (rows,)."""
    if (bias is not None) != has_bias or bias is not None and (tuple(bias.shape) != (rows,)
                                                               or not bias.is_floating_point()):
        raise ValueError(f"{path}: {fqn}.bias does not match the model's layer (bias "
                         f"{'expected' if has_bias else 'not expected'}, float ({rows},)); same architecture?")


def load_packed_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a packed checkpoint back to a dense state dict, bit-exactly, every packed weight validated."""
    raw, meta = read_packed_file(path)
    state = {k: v for k, v in raw.items() if "@" not in k}
    for key, info in meta["packed"].items():
        dense = formats.from_tensors(packed_parts(raw, key), key).to_dense()
        state[key] = dense.T.contiguous() if info.get("transposed") else dense
    for key, target in meta["aliases"].items():
        state[key] = state[target]
    return state


def load_packed_model_(model: nn.Module, path: str | Path, layout: str = "auto") -> dict[str, list[str]]:
    """Load a packed checkpoint into a model of the same architecture, in place: each packed ``nn.Linear`` becomes a
    ``SparseLinear`` built from the packed tensors (validated against the model's weight shape; no dense copy), the
    other weights are copied in. Bit-exact. Every tensor is checked before the model is touched: a key the model
    lacks, a shape or dtype that differs, or a layout the kernels cannot trust is a ValueError naming it.

    Returns {"sparse": fqns now SparseLinear, "dense": packed weights loaded dense (e.g. GPT-2 Conv1D)}; a model
    weight the file lacks is an error (never a randomly initialised layer)."""
    raw, meta = read_packed_file(path)
    modules = dict(model.named_modules())
    expected = model.state_dict()
    state = {k: v for k, v in raw.items() if "@" not in k}
    swaps: dict[str, SparseLinear] = {}
    result: dict[str, list[str]] = {"sparse": [], "dense": []}
    for key, info in sorted(meta["packed"].items()):
        fqn = key.removesuffix(".weight")
        module = modules.get(fqn)
        if module is None or key not in expected and not isinstance(module, SparseLinear):
            raise ValueError(f"{_file(path)}: packed weight {key} names no weight of this model; same architecture?")
        transposed = bool(info.get("transposed"))
        if isinstance(module, SparseLinear):
            shape = (module.out_features, module.in_features)
        else:
            w = expected[key]
            shape = tuple(w.T.shape if transposed else w.shape)
        packed = formats.from_tensors(packed_parts(raw, key), key, shape)
        if isinstance(module, (nn.Linear, SparseLinear)) and not transposed:
            bias = state.pop(f"{fqn}.bias", None)
            check_bias(_file(path), fqn, bias, module.bias is not None, shape[0])
            swaps[fqn] = SparseLinear.from_packed(packed, bias, layout)
            result["sparse"].append(fqn)
        else:
            dense = packed.to_dense()
            state[key] = dense.T.contiguous() if transposed else dense
            result["dense"].append(fqn)
    for key, target in meta["aliases"].items():
        if target in state:
            state[key] = state[target]
    prefixes = tuple(f"{fqn}." for fqn in swaps)
    for key, t in state.items():
        if key.startswith(prefixes) or key not in expected:
            raise ValueError(f"{_file(path)}: tensor {key} is not a weight of this model (after packing); "
                             f"same architecture?")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ValueError(f"{_file(path)}: {key} has shape {tuple(t.shape)} but the model expects "
                             f"{tuple(expected[key].shape)}; same architecture?")
        if t.is_floating_point() != expected[key].is_floating_point():
            raise ValueError(f"{_file(path)}: {key} has dtype {t.dtype}, the model {expected[key].dtype}")
    missing = sorted(k for k in expected if k not in state and not k.startswith(prefixes)
                     and k not in meta["packed"])
    if missing:
        raise ValueError(f"{_file(path)} lacks {len(missing)} weights of this model, e.g. {missing[:3]}; the file is "
                         f"incomplete or belongs to another architecture")
    for fqn, new in swaps.items():
        swap_module_(model, fqn, new)
    model.load_state_dict(state, strict=False)  # every key checked above; the swapped layers hold their own
    return result
