"""The GPU check of issue 16, prepared as one short script for a machine with a CUDA GPU.

It prunes SmolLM2-135M with wanda and sparsegpt (50%) once on the CPU and once on the GPU with the same calibration
windows, and prints for each method: wall time on both, peak GPU memory, where the cached activations lived, the
fraction of mask entries that agree, and the perplexity of both pruned models (evaluated on the GPU). Then it runs
the CUDA tests (tests/test_cuda.py). Results also go to ``--out`` as JSON. Usage (about 3 min on one GPU):
    python bench/gpu_check.py [--nsamples 32 --seqlen 512 --eval-windows 8 --out gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--out", default="gpu_check.json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible (torch.cuda.is_available() is False): run this on a GPU machine")
    from sparsecraft import data, evaluate
    from sparsecraft.api import prune
    from sparsecraft.engine.capture import auto_offload, as_batches
    from sparsecraft.models import load_model

    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    _, tok = load_model("default", dtype=torch.float32)
    calib = data.calibration_data(tok, None, a.nsamples, a.seqlen)
    windows = data.evaluation_data(tok, None, a.seqlen, a.eval_windows)
    rows = []
    for method in a.methods.split(","):
        runs = {}
        for device in ("cpu", "cuda"):
            model, _ = load_model("default", dtype=torch.float32)
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            res = prune(model, method, 0.5, calibration=calib, device=device, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            ppl = evaluate.perplexity(model.to("cuda"), windows.to("cuda"))
            runs[device] = {"wall_s": wall, "ppl": ppl, "masks": res.masks,
                            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20}
            if device == "cuda":
                offload = auto_offload(model, as_batches(calib, 8), "cuda", torch.float32)
                runs[device]["activations_on"] = str(offload)
            del model
            torch.cuda.empty_cache()
        cpu_masks, gpu_masks = runs["cpu"]["masks"], runs["cuda"]["masks"]
        agree = sum(int((cpu_masks[k] == gpu_masks[k].cpu()).sum()) for k in cpu_masks)
        total = sum(m.numel() for m in cpu_masks.values())
        row = {"method": method, "cpu_wall_s": runs["cpu"]["wall_s"], "gpu_wall_s": runs["cuda"]["wall_s"],
               "speedup": runs["cpu"]["wall_s"] / runs["cuda"]["wall_s"],
               "peak_cuda_mib": runs["cuda"]["peak_cuda_mib"],
               "activations_on": runs["cuda"]["activations_on"], "mask_agreement": agree / total,
               "ppl_cpu_pruned": runs["cpu"]["ppl"], "ppl_gpu_pruned": runs["cuda"]["ppl"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py"],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    print(tests.stdout[-3000:], tests.stderr[-2000:])
    Path(a.out).write_text(json.dumps({"rows": rows, "cuda_tests_rc": tests.returncode}, indent=1))
    print("| method | CPU wall (s) | GPU wall (s) | speedup | peak GPU (MiB) | masks agree | ppl CPU-pruned | "
          "ppl GPU-pruned |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['cpu_wall_s']:.1f} | {r['gpu_wall_s']:.1f} | {r['speedup']:.1f}x | "
              f"{r['peak_cuda_mib']:.0f} | {r['mask_agreement']:.4f} | {r['ppl_cpu_pruned']:.3f} | "
              f"{r['ppl_gpu_pruned']:.3f} |")
    sys.exit(tests.returncode)


if __name__ == "__main__":
    main()
