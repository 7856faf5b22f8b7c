"""Resumable one-shot runs: after each block, its pruned weights, masks and the propagated activations are saved.

Layout of the state folder: ``block_<i>.safetensors`` (weights and keep-masks of block i's pruned layers, module
layout), ``hidden_<i>.safetensors`` (the inputs of block i + 1) and ``progress.json`` (fingerprint of the run, last
finished block, per-layer records, free-form extras). Every file is written atomically, and ``progress.json`` is
written LAST and is the only commit point: it names the block whose files are complete, and every file records the
block it belongs to, checked on restore. A kill between any two writes leaves the previous commit intact (the files
of the unfinished block are simply overwritten by the rerun).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sparsecraft.engine.capture import BlockCall
from sparsecraft.engine.record import LayerRecord, PruneResult
from sparsecraft.io import atomic_save_tensors, atomic_write_bytes

PROGRESS = "progress.json"


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_fingerprint(spec: str | None) -> dict[str, Any]:
    """What a model spec points to, by content: every file of a local folder (or the .gguf file) with its size and
    sha256; a hub id or the embedded default by name (the hub revision is pinned by the download cache)."""
    if spec is None:
        return {"spec": None}
    path = Path(spec)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return {"spec": spec, "files": {str(p.relative_to(path) if path.is_dir() else p.name):
                                    [p.stat().st_size, file_digest(p)] for p in files}}


def text_digest(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResumeState:
    def __init__(self, folder: str | Path, fingerprint: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalise (tuples -> lists)
        self.extras: dict[str, Any] = {}
        self.last_block = -1
        self._records: dict[str, Any] = {}
        progress = self.folder / PROGRESS
        if progress.is_file():
            try:
                saved = json.loads(progress.read_text())
                fingerprint_saved, last, records = saved["fingerprint"], saved["last_block"], saved["records"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"the resume state in {self.folder} is damaged; pass --overwrite to start again") \
                    from None
            if fingerprint_saved != self.fingerprint:
                changed = sorted(k for k in set(fingerprint_saved) | set(self.fingerprint)
                                 if fingerprint_saved.get(k) != self.fingerprint.get(k))
                raise ValueError(f"the unfinished run in {self.folder} used different inputs or settings (changed: "
                                 f"{', '.join(changed)}); rerun with the same ones to resume, or pass --overwrite "
                                 f"to start again")
            self.last_block, self._records = int(last), records
            self.extras = saved.get("extras", {})
        self.folder.mkdir(parents=True, exist_ok=True)

    def write_progress(self, records: dict[str, Any]) -> None:
        body = {"fingerprint": self.fingerprint, "last_block": self.last_block, "records": records,
                "extras": self.extras}
        atomic_write_bytes(self.folder / PROGRESS, json.dumps(body, indent=1).encode())

    def _load_checked(self, name: str, block: int) -> dict[str, torch.Tensor]:
        path = self.folder / name
        try:
            with safe_open(str(path), "pt") as f:
                owner = (f.metadata() or {}).get("block")
            tensors = load_file(str(path))
        except Exception:  # missing or damaged: safetensors raises its own types
            raise ValueError(f"the resume state in {self.folder} is incomplete ({name} unreadable); pass "
                             f"--overwrite to start again") from None
        if owner != str(block):
            raise ValueError(f"the resume state in {self.folder} mixes blocks ({name} belongs to block {owner}, "
                             f"expected {block}); pass --overwrite to start again")
        return tensors

    def restore(self, model: nn.Module, calls: list[BlockCall], result: PruneResult) -> int:
        """Re-apply finished blocks to ``model``, load the saved activations into ``calls``; -> next block."""
        if self.last_block < 0:
            return 0
        modules = dict(model.named_modules())
        for i in range(self.last_block + 1):
            for key, tensor in self._load_checked(f"block_{i}.safetensors", i).items():
                fqn, kind = key.rsplit(":", 1)
                if fqn not in modules:
                    raise ValueError(f"the resume state names {fqn}, which this model lacks; pass --overwrite")
                if kind == "weight":
                    with torch.no_grad():
                        modules[fqn].weight.copy_(tensor)
                else:
                    result.masks[fqn] = tensor
        for fqn, rec in self._records.items():
            rec["shape"] = tuple(rec["shape"])
            result.layers[fqn] = LayerRecord(**rec)
        result.seconds = self.extras.get("prune_seconds", 0.0)
        hidden = self._load_checked(f"hidden_{self.last_block}.safetensors", self.last_block)
        if len(hidden) != len(calls) or any(hidden[str(j)].shape != c.hidden.shape for j, c in enumerate(calls)):
            raise ValueError("saved activations do not match the calibration set; pass --overwrite to start again")
        for j, call in enumerate(calls):
            call.hidden = hidden[str(j)].to(call.hidden.device, call.hidden.dtype)
        return self.last_block + 1

    def save(self, i: int, result: PruneResult, calls: list[BlockCall]) -> None:
        """Called by the engine after block ``i``: its weights and masks, its outputs, then the commit point."""
        prefix = f"{result.blocks}.{i}."
        model_of = getattr(self, "model_modules", None)
        assert model_of is not None, "call bind(model) before running"
        tensors = {}
        for fqn, keep in result.masks.items():
            if fqn.startswith(prefix):
                tensors[f"{fqn}:weight"] = model_of[fqn].weight.detach().cpu()
                tensors[f"{fqn}:keep"] = keep
        meta = {"block": str(i)}
        atomic_save_tensors(tensors, self.folder / f"block_{i}.safetensors", meta)
        atomic_save_tensors({str(j): c.hidden for j, c in enumerate(calls)}, self.folder / f"hidden_{i}.safetensors",
                            meta)
        self.last_block = i
        self.extras["prune_seconds"] = result.seconds
        self.write_progress({k: v.to_dict() for k, v in result.layers.items()})  # the commit point
        (self.folder / f"hidden_{i - 1}.safetensors").unlink(missing_ok=True)  # superseded

    def bind(self, model: nn.Module) -> "ResumeState":
        self.model_modules = dict(model.named_modules())
        return self
