"""from_pretrained of the packed SmolLM2-135M (50% unstructured, magnitude) vs its dense folder: peak RSS and time,
each load in its own fresh subprocess; then decode tokens/s of the packed model loaded through transformers vs the
masked dense model, interleaved in one run.

    python bench/bench_load.py --workdir /tmp/bench_load --new-tokens 32 --rounds 3

The folders are built once under --workdir (dense: save_pretrained of the masked fp32 model; packed: save_packed +
complete_packed_folder, as `sparsecraft prune` writes OUT/sparse) and reused. Peak RSS is the child's VmHWM,
(VmHWM), so it includes the Python + torch + transformers import (measured alone too, as "import only").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import sys, time, json

def hwm():  # this process's peak RSS (VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

import torch
from transformers import AutoModelForCausalLM
if sys.argv[2] == "packed":
    import sparsecraft  # registers quant_method "sparsecraft"
rss0 = hwm()
t = time.perf_counter()
if sys.argv[2] != "import":
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_rss": hwm(), "rss_before": rss0}))
"""


def build(workdir: Path) -> tuple[Path, Path]:
    import torch

    from sparsecraft.checkpoint import PACKED_FILE, save_packed
    from sparsecraft.hf_quantizer import complete_packed_folder
    from sparsecraft.models import load_model
    from sparsecraft.patterns import topk_mask

    dense, packed = workdir / "dense", workdir / "packed"
    if (packed / "config.json").is_file():
        return dense, packed
    model, tok = load_model("default", dtype=torch.float32)
    masks = {}
    for fqn, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in fqn:
            masks[fqn] = topk_mask(module.weight.detach().abs(), 0.5, "unstructured")
            with torch.no_grad():
                module.weight.mul_(masks[fqn])
    model.save_pretrained(dense)
    tok.save_pretrained(dense)
    packed.mkdir(parents=True, exist_ok=True)
    save_packed(model, masks, None, packed / PACKED_FILE)
    complete_packed_folder(packed, dense)
    return dense, packed


def measure_load(folder: Path, kind: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), kind], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench_load")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dense, packed = build(Path(args.workdir))
    sizes = {name: sum(f.stat().st_size for f in d.glob("*.safetensors")) for name, d in (("dense", dense),
                                                                                              ("packed", packed))}
    base = measure_load(dense, "import")
    loads = {"dense": measure_load(dense, "dense"), "packed": measure_load(packed, "packed")}
    print(f"weights file: dense {sizes['dense'] / 2**20:.1f} MiB, packed {sizes['packed'] / 2**20:.1f} MiB "
          f"(packed/dense {sizes['packed'] / sizes['dense']:.3f})")
    print(f"import only: peak RSS {base['peak_rss'] / 2**20:.0f} MiB")
    for name, r in loads.items():
        print(f"from_pretrained {name:6s}: {r['seconds']:.2f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB "
              f"(+{(r['peak_rss'] - r['rss_before']) / 2**20:.0f} MiB over the imports)")
    d, p = loads["dense"], loads["packed"]
    print(f"packed/dense: time {p['seconds'] / d['seconds']:.2f}x, peak RSS {p['peak_rss'] / d['peak_rss']:.2f}x, "
          f"added RSS {(p['peak_rss'] - p['rss_before']) / max(1, d['peak_rss'] - d['rss_before']):.2f}x")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sparsecraft  # noqa: F401
    from sparsecraft.evaluate import decode_race

    tok = AutoTokenizer.from_pretrained(packed)
    ids = tok("The history of the printing press begins", return_tensors="pt").input_ids
    models = {"dense": AutoModelForCausalLM.from_pretrained(dense).eval(),
              "packed": AutoModelForCausalLM.from_pretrained(packed).eval()}
    t = time.perf_counter()
    rates, outs = decode_race(models, ids, args.new_tokens, args.rounds)
    same = torch.equal(outs["dense"], outs["packed"])
    print(f"decode ({args.new_tokens} tokens, median of {args.rounds}, {torch.get_num_threads()} threads): dense "
          f"{rates['dense']:.1f} tok/s, packed via from_pretrained {rates['packed']:.1f} tok/s, packed/dense "
          f"{rates['packed'] / rates['dense']:.2f}x; same tokens: {same} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
