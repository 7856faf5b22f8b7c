"""sparsecraft's wanda / sparsegpt against llm-compressor's on the same model, windows and machine (issue 14, item 4).

The reference is ``llmcompressor==0.14.0.1`` (PyPI), installed pinned into its own virtual environment
(``~/.cache/sparsecraft/bench-venvs/llmcompressor-0.14.0.1``, created on the first run and reused; it is never a
dependency of sparsecraft). Both sides read the same files, written once per setting under ``--work``:
- SmolLM2-135M (``sparsecraft.models.load_model("default")``) as a safetensors Hugging Face folder, in ``--dtype``;
- the calibration windows (``sparsecraft.data.calibration_data``, NxT) and the evaluation windows (held-out text).

Every run is its own process (so its peak RSS is its own), in alternating order (reference first, then sparsecraft
first, ...). A run loads the model and imports its side's package (not timed), resets the process's peak RSS
(/proc/self/clear_refs), times the pruning call itself (``sparsecraft.prune(...)`` / ``llmcompressor.oneshot(...)``:
capture + calibration + pruning + propagation; neither side writes a checkpoint), reads the peak RSS and CPU seconds,
counts the zeros of every Linear inside the blocks, and scores the pruned model's perplexity on the evaluation
windows with the one function below (the same on both sides). Settings on both sides: 50% unstructured, every
Linear in the decoder blocks, the same batch size, sparsegpt block size 128 and dampening 0.01, no shuffling.

Usage (2 shared CPU cores at load average 10: 16x512 wanda about 4-6 min per run, sparsegpt longer):
    python bench/bench_reference.py [--settings 16x512,64x512] [--methods wanda,sparsegpt] [--repeats 1]
        [--dtype bfloat16] [--batch-size 8] [--eval-windows 16] [--out bench/results/reference.jsonl]
Prints a Markdown table with sparsecraft / reference ratios of wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Only the standard library at module level: the reference side runs this file in its own venv, without sparsecraft.
REFERENCE = "llmcompressor==0.14.0.1"
REFERENCE_PINS = [REFERENCE, "torch==2.13.0", "transformers>=5.15,<=5.17", "compressed-tensors==0.19.0",
                  "auto-round", "accelerate", "datasets"]
VENV = Path.home() / ".cache" / "sparsecraft" / "bench-venvs" / "llmcompressor-0.14.0.1"
SIDES = ("llmcompressor", "sparsecraft")


# ----------------------------------------------------------------------------------------------- the reference's venv
def reference_python() -> Path:
    """The reference venv's python, creating the venv and installing the pinned reference on first use."""
    py = VENV / "bin" / "python"
    probe = [str(py), "-c", "import importlib.metadata as m; print(m.version('llmcompressor'))"]
    if py.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "0.14.0.1":
        return py
    print(f"creating {VENV} and installing {REFERENCE} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    # torch first and pinned: the CPU wheel is on local disk; an unpinned torch would pull a multi-GB CUDA build
    subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *REFERENCE_PINS], check=True)
    return py


def versions(python: Path | str) -> str:
    code = ("import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in "
            "('llmcompressor', 'sparsecraft', 'transformers', 'torch', 'compressed-tensors') "
            "if __import__('importlib.util').util.find_spec(p.replace('-', '_'))))")
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------------------------------------- shared inputs
def prepare(work: Path, dtype: str, nsamples: int, seqlen: int, eval_windows: int,
            eval_seqlen: int) -> tuple[Path, Path]:
    """Write (once) the model folder and the windows file both sides read -> (model dir, data file)."""
    import torch

    from sparsecraft.data import calibration_data, evaluation_data
    from sparsecraft.models import load_model

    model_dir = work / f"smollm2-135m-{dtype}"
    data_file = work / f"windows-{nsamples}x{seqlen}-eval{eval_windows}x{eval_seqlen}.pt"
    if (model_dir / "config.json").exists() and data_file.exists():
        return model_dir, data_file
    model, tok = load_model("default", dtype=getattr(torch, dtype))
    if not (model_dir / "config.json").exists():
        model.save_pretrained(model_dir, safe_serialization=True)
        tok.save_pretrained(model_dir)
    calib = calibration_data(tok, "shakespeare", nsamples, seqlen, seed=0)  # (N, T)
    windows = evaluation_data(tok, "shakespeare", eval_seqlen, eval_windows)  # (E, T_eval)
    torch.save({"calib": calib, "eval": windows}, data_file)
    return model_dir, data_file


# ------------------------------------------------------------------------------------- one run (in a child process)
def rss_mib(field: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)


def perplexity(model, windows, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every predicted token of every window (T - 1 per window); both sides."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


def block_zero_fraction(model) -> float:
    """Zeros / numel over every Linear weight inside the decoder blocks (model.model.layers)."""
    import torch

    zeros = total = 0
    for m in model.model.layers.modules():
        if isinstance(m, torch.nn.Linear):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / total


def sparsecraft_pruner(method: str, batch_size: int) -> Callable:
    """Import sparsecraft (outside the timed region) -> prune(model, calib)."""
    import sparsecraft

    def prune(model, calib) -> None:
        sparsecraft.prune(model, method, 0.5, "unstructured", calib, batch_size=batch_size, device="cpu",
                          offload="cpu", progress=False)
    return prune


def llmcompressor_pruner(method: str, batch_size: int, tok) -> Callable:
    """Import llm-compressor and build its modifier (outside the timed region) -> prune(model, calib)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    blocks = [r"re:model\.layers\.\d+$"]  # every Linear inside the decoder blocks; embeddings and lm_head untouched
    if method == "wanda":
        modifier = WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=blocks)
    else:
        modifier = SparseGPTModifier(sparsity=0.5, mask_structure="0:0", targets=blocks, block_size=128,
                                     dampening_frac=0.01)

    def prune(model, calib) -> None:
        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * calib.shape[0]})
        oneshot(model=model, processor=tok, dataset=ds, recipe=modifier, num_calibration_samples=calib.shape[0],
                max_seq_length=calib.shape[1], batch_size=batch_size, shuffle_calibration_samples=False)
    return prune


def run_child(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    data = torch.load(args.data)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()
    dense_zeros = block_zero_fraction(model)
    make_pruner = {"sparsecraft": lambda: sparsecraft_pruner(args.method, args.batch_size),
                   "llmcompressor": lambda: llmcompressor_pruner(args.method, args.batch_size, tok),
                   "dense": lambda: (lambda model, calib: None)}[args.side]  # imports are not timed
    if args.warm:  # a first prune on a copy (2 windows) pages in the code and fills the allocator caches of both
        import copy  # sides, so "above model" is what the measured prune itself holds
        import gc

        warm = copy.deepcopy(model)
        make_pruner()(warm, data["calib"][:2])
        if args.side == "llmcompressor":  # its modifiers and session refuse a second initialisation
            from llmcompressor.core.session_functions import reset_session
            reset_session()
        del warm
        gc.collect()
    pruner = make_pruner()
    rss_model = rss_mib("VmRSS")
    reset_peak_rss()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    pruner(model, data["calib"])
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = rss_mib("VmHWM")
    row = {"side": args.side, "method": args.method, "setting": f"{data['calib'].shape[0]}x{data['calib'].shape[1]}",
           "prune_s": seconds, "cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
           "rss_model_mib": rss_model, "peak_rss_mib": peak, "warm": args.warm, "added_mib": peak - rss_model,
           "block_zeros": block_zero_fraction(model), "dense_zeros": dense_zeros,
           "ppl": perplexity(model, data["eval"]), "threads": torch.get_num_threads(),
           "loadavg_end": os.getloadavg()[0]}
    Path(args.result).write_text(json.dumps(row))


# -------------------------------------------------------------------------------------------------------- driver
def run_one(python: Path | str, side: str, method: str, model_dir: Path, data_file: Path,
            args: argparse.Namespace) -> dict:
    result = Path(args.work) / f"result-{os.getpid()}.json"
    result.unlink(missing_ok=True)
    load0 = os.getloadavg()[0]
    cmd = [str(python), __file__, "--child", side, "--method", method, "--model-dir", str(model_dir),
           "--data", str(data_file), "--result", str(result), "--dtype", args.dtype, "--threads",
           str(args.threads), "--batch-size", str(args.batch_size)] + (["--warm"] if args.warm else [])
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{side} {method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(result.read_text())
    row["loadavg_start"] = load0
    return row


def table(rows: list[dict]) -> str:
    out = ["| setting | method | side | prune s | CPU s | peak RSS MiB | above model MiB | block zeros | ppl | load avg |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['setting']} | {r['method']} | {r['side']} | {r['prune_s']:.1f} | {r.get('cpu_s', 0):.1f} | "
                   f"{r['peak_rss_mib']:.0f} | "
                   f"{r['added_mib']:.0f} | {r['block_zeros']:.4f} | {r['ppl']:.2f} | "
                   f"{r['loadavg_start']:.1f} -> {r['loadavg_end']:.1f} |")
    out += ["", "| setting | method | wall time sparsecraft / reference | CPU time ratio | above-model RSS ratio "
            "| ppl sc / ref |", "|---|---|---:|---:|---:|---:|"]
    keys = sorted({(r["setting"], r["method"]) for r in rows if r["side"] != "dense"})
    for setting, method in keys:
        def mean(side: str, k: str) -> float:
            vals = [r.get(k, 0.0) for r in rows if (r["setting"], r["method"], r["side"]) == (setting, method, side)]
            return sum(vals) / len(vals)
        out.append(f"| {setting} | {method} | {mean('sparsecraft', 'prune_s') / mean('llmcompressor', 'prune_s'):.2f} "
                   f"| {mean('sparsecraft', 'cpu_s') / max(mean('llmcompressor', 'cpu_s'), 1e-9):.2f} "
                   f"| {mean('sparsecraft', 'added_mib') / mean('llmcompressor', 'added_mib'):.2f} "
                   f"| {mean('sparsecraft', 'ppl') / mean('llmcompressor', 'ppl'):.3f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="16x512", help="comma-separated NxT calibration settings")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side; the order alternates")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-dense", action="store_true", help="skip the unpruned model's perplexity row")
    ap.add_argument("--warm", action="store_true",
                    help="prune a copy on 2 windows first (not measured), so the peak above the model excludes "
                         "code paged in on first use and allocator caches (both sides)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "sparsecraft" / "bench-reference"))
    ap.add_argument("--out", default="bench/results/reference.jsonl")
    ap.add_argument("--child", choices=("dense",) + SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.side = args.child
        return run_child(args)

    ref_py = reference_python()
    pythons = {"llmcompressor": ref_py, "sparsecraft": Path(sys.executable), "dense": Path(sys.executable)}
    print(f"reference: {versions(ref_py)}\nsparsecraft side: {versions(sys.executable)}", flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    turn = 0
    for setting in args.settings.split(","):
        n, t = (int(v) for v in setting.lower().split("x"))
        model_dir, data_file = prepare(work, args.dtype, n, t, args.eval_windows, args.eval_seqlen)
        if not args.no_dense:
            rows.append(run_one(pythons["dense"], "dense", "none", model_dir, data_file, args))
            print(json.dumps(rows[-1]), flush=True)
        for method in args.methods.split(","):
            for _ in range(args.repeats):
                order = SIDES if turn % 2 == 0 else SIDES[::-1]
                turn += 1
                for side in order:
                    rows.append(run_one(pythons[side], side, method, model_dir, data_file, args))
                    print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps({**r, "dtype": args.dtype, "batch_size": args.batch_size}) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
