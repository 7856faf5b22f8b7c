"""``sparsecraft inspect PATH``: per-layer sparsity and pattern of a checkpoint, as a table, and the sparsity over
the prunable layers and over all parameters, separately.

PATH may be a dense folder or file (zeros counted, or ``masks.safetensors`` beside it), the output folder of
``sparsecraft prune`` (dense weights + masks), or a packed folder or file (``OUT/sparse``, ``sparsecraft pack``): the
packed weights are read through sparsecraft.checkpoint and their keep-masks decoded from the packed format.
Prunable layers: the 2-D weights inside the numbered blocks (``...layers.N...``) and every weight a mask or the
packed file names; embeddings and the LM head are counted only in "all parameters".
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sparsecraft import formats
from sparsecraft.checkpoint import PACKED_FILE, load_masks, load_packed_state_dict, read_packed_file
from sparsecraft.patterns import NM, satisfies

IN_BLOCK = re.compile(r"\.\d+\.")  # a key inside a numbered block, e.g. model.layers.3.mlp.up_proj.weight


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="per-layer sparsity and pattern of a checkpoint")
    p.add_argument("path", help="output folder of `sparsecraft prune`, a packed folder (OUT/sparse), a HF folder, or "
                                "a .safetensors file")
    p.add_argument("--all", action="store_true", help="also list dense (unpruned) 2-D weights")
    p.set_defaults(func=run)


def detect_pattern(zero: torch.Tensor) -> str:
    """The most specific N:M pattern the zeros satisfy (n kept per m along rows), else 'unstructured'."""
    keep = ~zero
    for n, m in ((1, 4), (2, 4), (2, 8), (4, 8)):
        if keep.shape[1] % m == 0 and satisfies(keep, NM(n, m)):
            return f"{n}:{m}"
    return "unstructured"


def _file(path: Path) -> Path:
    if path.is_dir():
        if (path / PACKED_FILE).is_file():
            return path / PACKED_FILE
        if (path / "sparse" / PACKED_FILE).is_file():
            return path / "sparse" / PACKED_FILE
        raise ValueError(f"{path} holds no model.safetensors; pass a checkpoint folder or .safetensors file")
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass a checkpoint folder or a .safetensors file")
    return path


def _is_packed(file: Path) -> bool:
    try:
        with safe_open(str(file), framework="pt") as f:
            return "sparsecraft" in (f.metadata() or {})
    except Exception as e:
        raise ValueError(f"cannot read {file} ({e}); the file is corrupt or not safetensors") from None


def _packed_keeps(file: Path) -> dict[str, torch.Tensor]:
    """{fqn: keep (shape of the model's weight)} of every packed weight, decoded from the packed format."""
    raw, meta = read_packed_file(file, select=lambda key: "@" in key)
    keeps = {}
    for key, info in meta["packed"].items():
        parts = {k.split("@", 1)[1]: v for k, v in raw.items() if k.startswith(key + "@")}
        keep = formats.from_tensors(parts, key).keep()
        keeps[key.removesuffix(".weight")] = keep.T if info.get("transposed") else keep
    return keeps


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """-> (weights, each tensor once; {fqn: keep} from masks or the packed file; what the keeps came from)."""
    file = _file(path)
    if _is_packed(file):
        state = load_packed_state_dict(file)
        unique = {id(t): k for k, t in reversed(list(state.items()))}  # tied aliases share one tensor: count once
        return {k: state[k] for k in sorted(unique.values())}, _packed_keeps(file), "packed"
    try:
        weights = load_file(str(file))
    except Exception as e:
        raise ValueError(f"cannot read {file} ({e}); the file is corrupt or not safetensors") from None
    masks_file = path / "masks.safetensors" if path.is_dir() else None
    if masks_file is not None and masks_file.is_file():
        return weights, load_masks(masks_file), "mask"
    return weights, {}, "zeros"


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    weights, keeps, source = read_checkpoint(path)
    rows, prunable, pruned_zeros, pruned_total, all_zeros, all_total = [], 0, 0, 0, 0, 0
    for key, w in weights.items():
        fqn = key.removesuffix(".weight")
        zero = ~keeps[fqn] if fqn in keeps else (w == 0)
        n_zero = int(zero.sum())
        all_zeros, all_total = all_zeros + n_zero, all_total + w.numel()
        if w.ndim != 2 or not key.endswith(".weight") or not (fqn in keeps or IN_BLOCK.search(key)):
            continue
        prunable, pruned_zeros, pruned_total = prunable + 1, pruned_zeros + n_zero, pruned_total + w.numel()
        if not args.all and n_zero == 0:
            continue
        z2d = zero.T if tuple(zero.shape) != tuple(w.shape) else zero
        rows.append((fqn, f"{w.shape[0]}x{w.shape[1]}", f"{n_zero / w.numel():.4f}", detect_pattern(z2d),
                     source if fqn in keeps else "zeros"))
    if rows:
        head = ("layer", "shape", "sparsity", "pattern", "from")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
        for r in [head] + rows:
            print("  ".join(c.ljust(wd) for c, wd in zip(r, widths)))
        print()
    else:
        print("no sparse prunable 2-D weights found\n")
    print(f"prunable layers: {prunable} ({sum(1 for r in rows if float(r[2]) > 0)} sparse), sparsity "
          f"{pruned_zeros / max(1, pruned_total):.4f} ({pruned_zeros} of {pruned_total} weights are zero)")
    print(f"all parameters: sparsity {all_zeros / max(1, all_total):.4f} ({all_zeros} of {all_total} are zero); "
          f"read from: {source if source != 'mask' else 'dense weights + masks.safetensors'}")
    return 0
