"""Resumable one-shot runs: after each block, its pruned weights, masks and the propagated activations are saved.

Layout of the state folder: ``progress.json`` (fingerprint of the run, last finished block, per-layer records,
free-form extras), ``block_<i>.safetensors`` (weights and keep-masks of block i's pruned layers, module layout) and
``hidden.safetensors`` (inputs of the next block). Every file is written to a temporary name, then renamed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from sparsecraft.engine.capture import BlockCall
from sparsecraft.engine.record import LayerRecord, PruneResult
from sparsecraft.io import atomic_save_tensors, atomic_write_bytes


class ResumeState:
    def __init__(self, folder: str | Path, fingerprint: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalise (tuples -> lists)
        self.extras: dict[str, Any] = {}
        self.last_block = -1
        progress = self.folder / "progress.json"
        if progress.is_file():
            saved = json.loads(progress.read_text())
            if saved["fingerprint"] != self.fingerprint:
                raise ValueError(f"the unfinished run in {self.folder.parent} used different settings; rerun with "
                                 f"the same settings to resume, or pass --overwrite to start again")
            self.last_block = saved["last_block"]
            self.extras = saved.get("extras", {})
            self._records = saved["records"]
        self.folder.mkdir(parents=True, exist_ok=True)

    def write_progress(self, records: dict[str, Any]) -> None:
        body = {"fingerprint": self.fingerprint, "last_block": self.last_block, "records": records,
                "extras": self.extras}
        atomic_write_bytes(self.folder / "progress.json", json.dumps(body, indent=1).encode())

    def restore(self, model: nn.Module, calls: list[BlockCall], result: PruneResult) -> int:
        """Re-apply finished blocks to ``model``, load the saved activations into ``calls``; -> next block."""
        if self.last_block < 0:
            return 0
        modules = dict(model.named_modules())
        for i in range(self.last_block + 1):
            saved = load_file(str(self.folder / f"block_{i}.safetensors"))
            for key, tensor in saved.items():
                fqn, kind = key.rsplit(":", 1)
                if kind == "weight":
                    with torch.no_grad():
                        modules[fqn].weight.copy_(tensor)
                else:
                    result.masks[fqn] = tensor
        for fqn, rec in self._records.items():
            rec["shape"] = tuple(rec["shape"])
            result.layers[fqn] = LayerRecord(**rec)
        result.seconds = self.extras.get("prune_seconds", 0.0)
        hidden = load_file(str(self.folder / "hidden.safetensors"))
        if len(hidden) != len(calls):
            raise ValueError("saved activations do not match the calibration set; pass --overwrite to start again")
        for j, call in enumerate(calls):
            call.hidden = hidden[str(j)]
        return self.last_block + 1

    def save(self, i: int, result: PruneResult, calls: list[BlockCall]) -> None:
        """Called by the engine after block ``i``: block weights and masks first, then activations, then progress."""
        prefix = f"{result.blocks}.{i}."
        model_of = getattr(self, "model_modules", None)
        assert model_of is not None, "call bind(model) before running"
        tensors = {}
        for fqn, keep in result.masks.items():
            if fqn.startswith(prefix):
                tensors[f"{fqn}:weight"] = model_of[fqn].weight.detach().cpu()
                tensors[f"{fqn}:keep"] = keep
        atomic_save_tensors(tensors, self.folder / f"block_{i}.safetensors")
        atomic_save_tensors({str(j): c.hidden for j, c in enumerate(calls)}, self.folder / "hidden.safetensors")
        self.last_block = i
        self.extras["prune_seconds"] = result.seconds
        self.write_progress({k: v.to_dict() for k, v in result.layers.items()})

    def bind(self, model: nn.Module) -> "ResumeState":
        self.model_modules = dict(model.named_modules())
        return self
