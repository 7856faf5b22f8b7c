"""``sparsecraft inspect PATH``: per-layer sparsity and pattern of a checkpoint, as a table."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparsecraft.checkpoint import PACKED_FILE, load_masks, load_packed_state_dict
from sparsecraft.patterns import NM, satisfies


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="per-layer sparsity and pattern of a checkpoint")
    p.add_argument("path", help="output folder of `sparsecraft prune`, a HF folder, or a .safetensors file")
    p.add_argument("--all", action="store_true", help="also list dense (unpruned) 2-D weights")
    p.set_defaults(func=run)


def detect_pattern(zero: torch.Tensor) -> str:
    """The most specific N:M pattern the zeros satisfy (n kept per m along rows), else 'unstructured'."""
    keep = ~zero
    for n, m in ((1, 4), (2, 4), (2, 8), (4, 8)):
        if keep.shape[1] % m == 0 and satisfies(keep, NM(n, m)):
            return f"{n}:{m}"
    return "unstructured"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        elif (path / "sparse" / PACKED_FILE).is_file():
            return load_packed_state_dict(path / "sparse")
        else:
            raise ValueError(f"{path} holds no model.safetensors; pass a checkpoint folder or .safetensors file")
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass a checkpoint folder or a .safetensors file")
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"cannot read {path} ({e}); the file is corrupt or not safetensors") from None


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    weights = _weights(path)
    masks = load_masks(path / "masks.safetensors") if (path / "masks.safetensors").is_file() else {}
    rows = []
    for key, w in weights.items():
        if w.ndim != 2 or not key.endswith(".weight"):
            continue
        fqn = key.removesuffix(".weight")
        zero = ~masks[fqn] if fqn in masks else (w == 0)
        if not args.all and fqn not in masks and not bool(zero.any()):
            continue
        z2d = zero.T if fqn in masks and masks[fqn].shape != w.shape else zero
        rows.append((fqn, f"{w.shape[0]}x{w.shape[1]}", f"{float(zero.float().mean()):.4f}", detect_pattern(z2d),
                     "mask" if fqn in masks else "zeros"))
    if not rows:
        print("no sparse 2-D weights found")
        return 0
    head = ("layer", "shape", "sparsity", "pattern", "from")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    for r in [head] + rows:
        print("  ".join(c.ljust(wd) for c, wd in zip(r, widths)))
    total = sum(int(weights[f + ".weight"].numel()) for f, *_ in rows)
    zeros = sum(float(r[2]) * weights[r[0] + ".weight"].numel() for r in rows)
    print(f"\n{len(rows)} layers, overall sparsity {zeros / total:.4f}")
    return 0
