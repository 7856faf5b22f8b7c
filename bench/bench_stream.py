"""Peak RSS and wall time of `sparsecraft prune` on SmolLM2-135M: in memory (--no-stream) vs streamed (the default for
a safetensors folder), and streamed with 1 process x 2 threads vs `torchrun --nproc-per-node 2` (2 processes x 1
thread), with the masks compared.

The embedded default model is first saved as a float32 safetensors folder (save_pretrained, one shard per 100 MB so
the folder is sharded like a large checkpoint). Every run is its own process (torchrun: its own process tree); its
peak RSS is the largest of its processes (os.wait4 for one process, report.json's per-rank peaks for torchrun).
Usage (about 5-8 min on 2 cores):
    python bench/bench_stream.py [--nsamples 16 --seqlen 256 --eval-windows 4 --method wanda --work /tmp/bench_stream]

Measured (quiet machine, load 1.5; `--method sparsegpt --nsamples 8 --seqlen 256 --eval-windows 2`): wall 48.7 s in
memory, 50.0 s streamed, 57.0 s with 2 procs x 1 thread (1.14x the 1 x 2 wall on these 2 cores); peak RSS 2116 /
1463 / 1088 MiB. The streamed masks equal the in-memory ones; the 2-rank masks differ in 4.6% of entries (sparse
perplexity 42.857 vs 41.020), and so does one process with one thread, entry for entry (42.86): the difference is
the thread count (matmul rounding, which SparseGPT's sequential updates amplify), not the data-parallel reduction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def save_default(folder: Path) -> int:
    """SmolLM2-135M as a float32 safetensors folder (sharded); -> bytes of its weight files."""
    from sparsecraft.models import load_model

    if not (folder / "model.safetensors.index.json").is_file():
        model, tok = load_model("default", dtype=torch.float32)
        model.save_pretrained(folder, max_shard_size="100MB")
        tok.save_pretrained(folder)
        del model
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    """-> (wall seconds, peak RSS bytes of the process itself); its output goes to ``log``."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-4000:]}")
    return wall, usage.ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--method", default="wanda")
    p.add_argument("--work", default="/tmp/bench_stream")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_bytes = save_default(work / "smollm2")
    print(f"checkpoint: {model_bytes / 2**20:.0f} MiB float32 safetensors ({time.perf_counter() - t0:.0f} s to write)")
    common = ["prune", "--model", str(work / "smollm2"), "--method", a.method, "--sparsity", "0.5", "--nsamples",
              str(a.nsamples), "--seqlen", str(a.seqlen), "--eval-windows", str(a.eval_windows), "--dtype", "float32",
              "--device", "cpu", "--no-progress", "--overwrite",
              "--no-speed"]  # the in-memory path's decode-speed row would dominate its wall time
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    one = [sys.executable, "-m", "sparsecraft"]
    runs = {
        "in memory, 1 proc x 2 threads": (one + common + ["--no-stream", "--output", str(work / "memory")],
                                          {**env, "OMP_NUM_THREADS": "2"}),
        "streamed, 1 proc x 2 threads": (one + common + ["--output", str(work / "stream1")],
                                         {**env, "OMP_NUM_THREADS": "2"}),
        "streamed, 2 procs x 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc-per-node", "2", "-m", "sparsecraft"] + common
                                         + ["--output", str(work / "stream2")], {**env, "OMP_NUM_THREADS": "1"}),
    }
    rows = []
    for name, (cmd, run_env) in runs.items():
        wall, rss = run(cmd, run_env, work / f"{len(rows)}.log")
        out = Path(cmd[cmd.index("--output") + 1])
        rep = json.loads((out / "report.json").read_text())
        ranks = rep.get("streaming", {}).get("peak_rss_per_rank")
        peak = max(ranks) if ranks and "2 procs" in name else rss  # torchrun: rss above is the launcher's
        rows.append((name, wall, rep["time_s"]["prune"], peak, rep["prune_memory_bytes"]["peak_rss"],
                     rep["perplexity"]["sparse"], out))
        print(f"{name}: wall {wall:.1f} s, peak RSS {peak / 2**20:.0f} MiB", flush=True)
    print(f"\nSmolLM2-135M ({model_bytes / 2**20:.0f} MiB fp32), {a.method} 50%, {a.nsamples}x{a.seqlen} calibration, "
          f"{a.eval_windows} eval windows\n")
    print("| run | wall (s) | prune (s) | peak RSS process (MiB) | peak RSS while pruning (MiB) | ppl sparse |")
    print("|---|---|---|---|---|---|")
    for name, wall, prune_s, peak, prune_rss, ppl, _ in rows:
        print(f"| {name} | {wall:.1f} | {prune_s:.1f} | {peak / 2**20:.0f} | {prune_rss / 2**20:.0f} | {ppl:.3f} |")
    mem, s1, s2 = rows
    print(f"\nstreamed / in-memory peak RSS: {s1[3] / mem[3]:.2f}; wall: {s1[1] / mem[1]:.2f}")
    print(f"2 procs x 1 thread / 1 proc x 2 threads wall: {s2[1] / s1[1]:.2f}; prune time: {s2[2] / s1[2]:.2f}")
    from sparsecraft.checkpoint import load_masks

    masks = [load_masks(r[6] / "masks.safetensors") for r in rows]
    for (name, *_), m in zip(rows[1:], masks[1:]):
        differ = sum(int((m[k] != masks[0][k]).sum()) for k in masks[0])
        total = sum(v.numel() for v in masks[0].values())
        print(f"masks of '{name}' vs in memory: {differ} of {total} entries differ"
              f"{' (equal)' if differ == 0 else ''}")
    for r in rows:  # about 0.6 GB each
        shutil.rmtree(r[6], ignore_errors=True)


if __name__ == "__main__":
    main()
