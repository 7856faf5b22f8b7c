"""The packed checkpoint as a Hugging Face checkpoint: ``quant_method: "sparsecraft"``, registered on ``import sparsecraft``.

A packed folder (``sparsecraft prune`` -> OUT/sparse, ``sparsecraft pack``) holds ``model.safetensors`` in the packed
layout (sparsecraft.checkpoint), the tokenizer, ``generation_config.json`` and a ``config.json`` that carries

- ``quantization_config`` = {"quant_method": "sparsecraft", "format_version": 1, "pattern": "2:4",
  "packed_modules": [fqn, ...]}: what the quantizer needs to rebuild the model;
- ``transformers_weights`` = ``GUARD``, a weights file name transformers refuses ("neither a safetensors file nor ...:
  <GUARD>"). Without sparsecraft, transformers only *warns* about an unknown quant_method and would load the model
  with every pruned layer randomly initialised; the guard turns that into an error that names the package. The
  quantizer removes the guard from the config before transformers resolves the weights file.

Loading (``AutoModelForCausalLM.from_pretrained(folder)`` after ``import sparsecraft``):
1. before the weights load, the metadata is checked against the (meta) model (every packed weight names a 2-D weight
   of it, the config's packed_modules match); each packed ``nn.Linear`` is replaced by a parameterless
   ``PendingSparse`` so transformers neither allocates nor initialises its dense weight;
2. transformers loads every other tensor (the packed entries are ignored, not reported as unexpected);
3. after loading, one layer at a time, its packed tensors are read (sha256 verified), validated against the layer's
   shape (``formats.from_tensors``: dtypes, shapes, pad bits, popcounts) and turned into ``SparseLinear.from_packed``
   (its layout checked again by ``check_layout``), then dropped: no dense copy of a pruned weight exists at any point,
   and the peak memory is the packed layers plus one layer (+320 MiB for a 323.5 MiB file, bench/bench_load.py).
   Packed weights of other layer types (GPT-2 Conv1D, stored transposed) are unpacked into their dense parameter.

``model.save_pretrained(dir)`` writes the packed tensors again (``checkpoint.packed_tensors``), bit-exactly; transformers
drops the guard from the config it writes, so a re-saved folder without sparsecraft loads with a warning only.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from sparsecraft import formats
from sparsecraft.checkpoint import PackedFile, check_bias, packed_parts, packed_tensors, read_packed_file
from sparsecraft.io import atomic_write_text
from sparsecraft.modules import SparseLinear, swap_module_

QUANT_METHOD = "sparsecraft"
FORMAT_VERSION = 1
GUARD = "sparsecraft packed checkpoint: pip install sparsecraft and run `import sparsecraft` before loading it"
# Besides config.json and the weights, what a packed folder copies from its dense source (tokenizer, generation).
FOLDER_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")
PACKED_KEY = re.compile(r"\.weight@[A-Za-z_]+$")  # the packed parts of a weight in the file (never model keys)


class SparsecraftConfig(QuantizationConfigMixin):
    """``quantization_config`` of a packed folder: the pattern, the packed modules (fqns) and the format version."""

    def __init__(self, pattern: str | None = None, packed_modules: list[str] | tuple[str, ...] = (),
                 format_version: int = FORMAT_VERSION, quant_method: str = QUANT_METHOD, **kwargs: Any):
        if format_version != FORMAT_VERSION:
            raise ValueError(f"quantization_config.format_version is {format_version!r}; this sparsecraft reads "
                             f"version {FORMAT_VERSION} (upgrade sparsecraft, or re-run `sparsecraft pack`)")
        if not (isinstance(packed_modules, (list, tuple)) and all(isinstance(m, str) for m in packed_modules)):
            raise ValueError("quantization_config.packed_modules must be a list of module names; the config.json "
                             "is corrupt (re-run `sparsecraft pack`)")
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        self.pattern = pattern
        self.packed_modules = sorted(packed_modules)


class PendingSparse(nn.Module):
    """Stands in for a packed ``nn.Linear`` while transformers loads the other weights: no parameters, so no dense
    weight is allocated or initialised; replaced by a ``SparseLinear`` after loading."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this layer was never loaded from its packed tensors (from_pretrained did not finish)")


class SparsecraftHfQuantizer(HfQuantizer):
    """Loads and saves packed sparsecraft checkpoints through ``from_pretrained`` / ``save_pretrained``."""

    requires_calibration = True  # packing happens in `sparsecraft prune` / `pack`, never while loading
    quantization_config: SparsecraftConfig

    def __init__(self, quantization_config: SparsecraftConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.pending: dict[str, tuple[formats.AnyPacked, torch.Tensor | None, bool]] = {}

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if not devices <= {None, "cpu", torch.device("cpu")}:
            raise ValueError(f"sparsecraft packed models run on the CPU kernels; got device_map={device_map!r}. "
                             f"Load without device_map (or device_map='cpu')")

    def update_attn_implementation(self, config: Any) -> Any:
        # Not about attention: this is the last hook before transformers resolves the weights file, so the guard
        # that stops loading without sparsecraft is removed here (only ours, never a user's explicit file name).
        if getattr(config, "transformers_weights", None) == GUARD:
            del config.transformers_weights
        return config

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        if not checkpoint_files or len(checkpoint_files) != 1:
            raise ValueError(f"a sparsecraft packed checkpoint is one model.safetensors file, got {checkpoint_files}; "
                             f"re-save it unsharded (save_pretrained(..., max_shard_size='1000GB'))")
        path = Path(checkpoint_files[0])
        with torch.device("cpu"):  # transformers builds the skeleton under a meta-device context
            self.pending = read_pending(model, path, set(self.quantization_config.packed_modules))
        ignore_unexpected = [PACKED_KEY.pattern]
        ignore_missing = []
        for fqn, layer in self.pending.items():
            if not layer.linear:  # the dense parameter stays and is filled after loading
                ignore_missing.append(f"^{re.escape(fqn)}\\.weight$")
            else:
                swap_module_(model, fqn, PendingSparse(layer.shape[1], layer.shape[0]))
                ignore_unexpected.append(f"^{re.escape(fqn)}\\.bias$")  # loaded with the packed weight
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | set(
            ignore_unexpected)
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | set(ignore_missing)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        dtype = _model_dtype(model)
        files: dict[Path, PackedFile] = {}  # each file opened and its metadata checked once
        for fqn in sorted(self.pending):  # one layer at a time: read, checked, converted, its packed tensors dropped
            layer = self.pending.pop(fqn)
            if layer.path not in files:
                files[layer.path] = PackedFile(layer.path)
            packed, bias = load_pending(layer, files[layer.path])
            packed = _cast(packed, dtype)
            if not layer.linear:  # a packed GPT-2 Conv1D weight: its dense parameter back
                param = model.get_submodule(fqn).weight
                with torch.no_grad():
                    dense = packed.to_dense()
                    param.data = (dense.T if layer.transposed else dense).contiguous().to(param.device)
            else:
                bias = None if bias is None else bias.to(dtype or bias.dtype)
                swap_module_(model, fqn, SparseLinear.from_packed(packed, bias))
            del packed, bias
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors, meta, _ = packed_tensors(model, {}, None)
        return tensors, {"sparsecraft": json.dumps(meta)}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


@dataclass
class PendingLayer:
    """A packed layer whose tensors are read after transformers has loaded the rest: where, what shape, and
    whether it comes back as a SparseLinear (an nn.Linear) or as a dense parameter (a GPT-2 Conv1D)."""

    path: Path
    fqn: str
    shape: tuple[int, int]  # (out, in) as packed
    linear: bool
    has_bias: bool
    transposed: bool


def read_pending(model: nn.Module, path: Path, listed: set[str]) -> dict[str, PendingLayer]:
    """The packed weights the metadata lists, checked against the model's layers (names, 2-D weights, bias or
    not) -> {fqn: PendingLayer}; their tensors are read and validated later, one layer at a time."""
    _, meta = read_packed_file(path, select=lambda key: False)  # the metadata and the file's structure only
    fqns = {key.removesuffix(".weight"): bool(info.get("transposed")) for key, info in meta["packed"].items()}
    if set(fqns) != listed:
        raise ValueError(f"{path}: config.json's quantization_config.packed_modules does not match the packed "
                         f"weights of the file (e.g. {sorted(set(fqns) ^ listed)[:3]}); the folder is inconsistent "
                         f"(re-run `sparsecraft pack`)")
    modules = dict(model.named_modules())
    pending = {}
    for fqn, transposed in sorted(fqns.items()):
        module = modules.get(fqn)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{path}: packed weight {fqn}.weight names no 2-D weight of this model; was the file "
                             f"packed from another architecture?")
        shape = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight.shape[1])
        pending[fqn] = PendingLayer(path, fqn, shape, isinstance(module, nn.Linear) and not transposed,
                                    getattr(module, "bias", None) is not None, transposed)
    return pending


def load_pending(layer: PendingLayer, file: PackedFile) -> tuple[formats.AnyPacked, torch.Tensor | None]:
    """One layer's packed tensors read from the open ``file`` (checksums verified) and validated against its
    shape -> (packed, bias)."""
    fqn, path = layer.fqn, layer.path
    raw = file.read(lambda k: k.startswith(f"{fqn}.weight@") or k == f"{fqn}.bias")
    packed = formats.from_tensors(packed_parts(raw, f"{fqn}.weight"), f"{path.name}: {fqn}.weight", layer.shape)
    bias = raw.get(f"{fqn}.bias") if layer.linear else None
    if layer.linear:
        check_bias(path, fqn, bias, layer.has_bias, layer.shape[0])
    return packed, bias


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floats[0] if floats else None


def _cast(packed: formats.AnyPacked, dtype: torch.dtype | None) -> formats.AnyPacked:
    """The packed weight with its values in ``dtype`` (from_pretrained(dtype=...)); the same object if they are."""
    field = "tiles" if isinstance(packed, formats.BlockPacked) else "values"
    values = getattr(packed, field)
    if dtype is None or values.dtype == dtype:
        return packed
    return dataclasses.replace(packed, **{field: values.to(dtype)})


def hf_config(config: dict[str, Any], packed_modules: list[str], pattern: str | None) -> dict[str, Any]:
    """A dense model's config.json dict -> the packed folder's: quantization_config + the guard."""
    out = {k: v for k, v in config.items() if k not in ("quantization_config", "transformers_weights")}
    out["quantization_config"] = SparsecraftConfig(pattern, packed_modules).to_dict()
    out["transformers_weights"] = GUARD
    return out


def complete_packed_folder(folder: Path, source: Path) -> None:
    """Make ``folder`` (its model.safetensors already packed) a complete Hugging Face checkpoint: config.json from
    ``source``'s (a dense checkpoint folder) with the quantization_config read from the packed file and the guard,
    and the tokenizer and generation config files of ``source``."""
    folder, source = Path(folder), Path(source)
    if not (source / "config.json").is_file():
        raise ValueError(f"{source} has no config.json; the packed folder needs the dense model's config")
    _, meta = read_packed_file(folder, select=lambda key: False)  # the metadata only
    modules = [key.removesuffix(".weight") for key in meta["packed"]]
    config = json.loads((source / "config.json").read_text())
    atomic_write_text(folder / "config.json",
                      json.dumps(hf_config(config, modules, meta.get("pattern")), indent=2, sort_keys=True) + "\n")
    for name in FOLDER_FILES:
        if (source / name).is_file() and source.resolve() != folder.resolve():
            shutil.copyfile(source / name, folder / name)


def register() -> None:
    """Register quant_method "sparsecraft" with transformers (idempotent; runs on ``import sparsecraft``)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SparsecraftConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SparsecraftHfQuantizer)


register()
