"""Keep-masks on disk (``masks.safetensors``): one bit per weight.

Each mask (rows, cols...) is stored as its bitmask rows, uint8 (rows, ceil(cols / 8)) in the bit order of
``sparsecraft.kernels.layout``, and its shape in the safetensors metadata (``MASKS_META``: JSON {fqn: shape}).
Files of sparsecraft 0.1 (torch.bool masks, no metadata) still load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from sparsecraft.io import atomic_save_tensors
from sparsecraft.kernels.layout import pack_bits, pad_bits_clear, unpack_bits

MASKS_META = "sparsecraft_masks"  # metadata key: JSON {fqn: shape} of the bitmasks


def save_masks(masks: dict[str, torch.Tensor], path: Path) -> None:
    """Write keep-masks {fqn: bool tensor} atomically, one bit per weight."""
    shapes = {fqn: list(m.shape) for fqn, m in masks.items()}
    bits = {fqn: pack_bits(m.bool().cpu().reshape(m.shape[0], -1)) for fqn, m in masks.items()}
    atomic_save_tensors(bits, path, metadata={MASKS_META: json.dumps(shapes)})


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    """Read ``save_masks``' file (or an older one that stores torch.bool masks) -> {fqn: keep bool}, validated."""
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(MASKS_META)
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"cannot read masks from {path} ({e}); the file is missing or corrupt") from None
    if text is None:  # one byte per weight (sparsecraft 0.1)
        if any(v.dtype != torch.bool for v in raw.values()):
            raise ValueError(f"{path}: masks must be torch.bool or sparsecraft bitmasks; the file is corrupt")
        return raw
    try:
        shapes = json.loads(text)
    except json.JSONDecodeError:
        shapes = None
    if not isinstance(shapes, dict) or set(shapes) != set(raw):
        raise ValueError(f"{path}: the mask shapes in the metadata do not match the stored masks; the file is corrupt")
    return {fqn: decode_mask(bits, shapes[fqn], f"{path}: mask {fqn}") for fqn, bits in raw.items()}


def decode_mask(bits: torch.Tensor, shape: object, name: str) -> torch.Tensor:
    """One stored bitmask and its recorded shape -> keep (shape) bool, validated."""
    if not (isinstance(shape, list) and len(shape) >= 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"{name} has an invalid shape {shape!r}; the file is corrupt")
    rows, cols = shape[0], math.prod(shape[1:])
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (rows, (cols + 7) // 8) or not pad_bits_clear(bits, cols):
        raise ValueError(f"{name} is not a ({rows}, {(cols + 7) // 8}) uint8 bitmask with clear pad bits; the file "
                         f"is corrupt")
    return unpack_bits(bits, cols).reshape(shape)
