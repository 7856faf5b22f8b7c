"""Check a pruned output folder of any size one layer at a time: the masks' sparsity, zeros in the dense Hugging Face
shards exactly where the masks say, the packed file equal to the dense weights bit for bit, and (``--load``) that
transformers reloads the dense folder and runs a forward pass. Memory stays at about one layer unless ``--load``.

    python bench/check_pruned.py /tmp/synth7b-out --sparsity 0.5 [--load]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open


def dense_weight(folder: Path, key: str, index: dict[str, str] | None) -> torch.Tensor:
    name = index[key] if index is not None else "model.safetensors"
    with safe_open(str(folder / name), framework="pt") as f:
        return f.get_tensor(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--sparsity", type=float, required=True, help="the uniform sparsity the prune asked for")
    ap.add_argument("--load", action="store_true", help="also reload the dense folder with transformers")
    a = ap.parse_args()
    from sparsecraft import formats
    from sparsecraft.checkpoint import PACKED_FILE, packed_parts, read_packed_file
    from sparsecraft.formats.masks import load_masks

    folder = a.folder
    if not (folder / "masks.safetensors").is_file():
        sys.exit(f"{folder} has no masks.safetensors: pass the --output folder of `sparsecraft prune`")
    idx_file = folder / "model.safetensors.index.json"
    index = json.loads(idx_file.read_text())["weight_map"] if idx_file.is_file() else None
    masks = load_masks(folder / "masks.safetensors")
    t0 = time.perf_counter()
    worst, kept, total, bad = 0.0, 0, 0, []
    for fqn, keep in masks.items():
        key = fqn + ".weight"
        s = 1 - keep.float().mean().item()
        worst = max(worst, abs(s - a.sparsity))
        kept, total = kept + int(keep.sum()), total + keep.numel()
        w = dense_weight(folder, key, index)
        if w.shape != keep.shape or bool((w[~keep] != 0).any()):
            bad.append(f"{key}: dense weight not zero where the mask prunes")
        raw, meta = read_packed_file(folder / "sparse" / PACKED_FILE, select=lambda k: k.startswith(key + "@"))
        packed = formats.from_tensors(packed_parts(raw, key), key).to_dense()
        packed = packed.T if meta["packed"][key].get("transposed") else packed
        if not torch.equal(packed, w):
            bad.append(f"{key}: packed weight differs from the dense one")
    print(f"{len(masks)} pruned layers checked in {time.perf_counter() - t0:.0f} s: overall sparsity "
          f"{1 - kept / total:.6f}, largest per-layer deviation from {a.sparsity} {worst:.2e}; "
          f"dense zeros and packed == dense: {'all equal' if not bad else f'{len(bad)} FAILED'}")
    for line in bad[:10]:
        print("  ", line)
    if a.load:
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        n = sum(int((p == 0).sum()) for name, p in model.named_parameters() if name.removesuffix(".weight") in masks)
        ids = torch.arange(2, 10).unsqueeze(0)
        with torch.no_grad():
            logits = model(ids).logits
        print(f"reloaded with transformers in {time.perf_counter() - t0:.0f} s ({model.dtype}): {n} zeros in the "
              f"pruned layers (masks prune {total - kept}), forward pass finite: {bool(torch.isfinite(logits).all())},"
              f" peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        bad += [] if n >= total - kept and torch.isfinite(logits).all() else ["reload"]
    sys.exit(1 if bad or worst > 1e-3 else 0)


if __name__ == "__main__":
    main()
