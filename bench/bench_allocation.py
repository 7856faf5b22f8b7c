"""Issue 7's table: uniform Wanda / SparseGPT vs non-uniform allocation (OWL, search) + DSnoT on SmolLM2-135M.

Default corpus ("shakespeare": calibration works vs held-out Hamlet/Macbeth/Othello). Reduced settings because the
machine has 2 shared cores: calibration 8 windows x 256 tokens (seed 0), evaluation 8 windows x 512 tokens.
Configurations are shared by ``--workers`` processes (one thread each); every finished row is appended to
``--out`` as one JSON line; rows already there are skipped (to resume, delete ``<out>.claims`` and rerun). Usage:
    OMP_NUM_THREADS=1 python bench/bench_allocation.py [--workers 2] [--out bench/results/allocation.jsonl]
    python bench/bench_allocation.py --table   # print the Markdown table from --out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OWL = {"M": 5.0, "lam": 0.08}  # the OWL paper's LLaMA settings, not tuned here
SEARCH = {"generations": 12, "offspring": 4, "survivors": 1, "fitness_windows": 2, "fitness_tokens": 128}
# name, method, method options, pattern, sparsity, allocation, allocation options; in priority order. Workers take
# the next unclaimed configuration (a claim is a file next to --out), so any number of workers share the list.
DSNOT = {"max_iter": 10}
DSNOT_DAMPED = {"max_iter": 10, "dampening": 0.1}  # ridge on the swap Hessian: 2,048 calibration tokens under-determine it
CONFIGS: list[tuple] = [
    ("dense", None, {}, "unstructured", 0.0, "uniform", {}),
    ("wanda", "wanda", {}, "unstructured", 0.7, "uniform", {}),
    ("sparsegpt", "sparsegpt", {}, "unstructured", 0.7, "uniform", {}),
    ("owl+wanda", "wanda", {}, "unstructured", 0.7, "owl", OWL),
    ("wanda+dsnot", "wanda+dsnot", DSNOT, "unstructured", 0.6, "uniform", {}),
    ("wanda", "wanda", {}, "unstructured", 0.6, "uniform", {}),
    ("owl+sparsegpt+dsnot", "sparsegpt+dsnot", DSNOT, "unstructured", 0.7, "owl", OWL),
    ("sparsegpt", "sparsegpt", {}, "unstructured", 0.6, "uniform", {}),
    ("owl+sparsegpt+dsnot", "sparsegpt+dsnot", DSNOT, "unstructured", 0.6, "owl", OWL),
    ("wanda", "wanda", {}, "2:4", None, "uniform", {}),
    ("sparsegpt", "sparsegpt", {}, "2:4", None, "uniform", {}),
    ("sparsegpt+dsnot", "sparsegpt+dsnot", DSNOT, "2:4", None, "uniform", {}),
    ("wanda", "wanda", {}, "unstructured", 0.5, "uniform", {}),
    ("sparsegpt", "sparsegpt", {}, "unstructured", 0.5, "uniform", {}),
    ("owl+sparsegpt+dsnot", "sparsegpt+dsnot", DSNOT, "unstructured", 0.5, "owl", OWL),
    ("search+wanda", "wanda", {}, "unstructured", 0.7, "search", SEARCH),
    ("sparsegpt+dsnot(damped)", "sparsegpt+dsnot", DSNOT_DAMPED, "2:4", None, "uniform", {}),
    ("sparsegpt+dsnot(damped)", "sparsegpt+dsnot", DSNOT_DAMPED, "unstructured", 0.5, "uniform", {}),
    ("sparsegpt+dsnot(damped)", "sparsegpt+dsnot", DSNOT_DAMPED, "unstructured", 0.6, "uniform", {}),
    ("sparsegpt+dsnot(damped)", "sparsegpt+dsnot", DSNOT_DAMPED, "unstructured", 0.7, "uniform", {}),
    ("owl+sparsegpt", "sparsegpt", {}, "unstructured", 0.5, "owl", OWL),
    ("search+sparsegpt", "sparsegpt", {}, "unstructured", 0.5, "search", SEARCH),
    ("sparsegpt+dsnot(damped 1.0)", "sparsegpt+dsnot", {"max_iter": 10, "dampening": 1.0}, "2:4", None, "uniform", {}),
]


def claim(c: tuple, out: Path) -> bool:
    """True if this process is the first to take configuration ``c``."""
    folder = out.with_suffix(".claims")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / key(c).replace("|", "_"), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def key(c: tuple) -> str:
    return f"{c[0]}|{c[3]}|{c[4]}"


def worker(index: int, args: argparse.Namespace) -> None:
    import torch

    from sparsecraft import data, evaluate
    from sparsecraft.api import allocate
    from sparsecraft.api import prune
    from sparsecraft.models import load_model

    model, tok = load_model(None)
    calib = data.calibration_data(tok, "shakespeare", args.nsamples, args.seqlen, seed=0)
    windows = data.evaluation_data(tok, "shakespeare", args.eval_seqlen,
                                args.eval_windows)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    order = CONFIGS if not args.only else [c for k in args.only.split(",") for c in CONFIGS if key(c) == k]
    for c in order:
        name, method, mopts, pattern, sparsity, alloc, aopts = c
        if key(c) in done_keys(Path(args.out)) or not claim(c, Path(args.out)):
            continue
        model.load_state_dict(dense)
        t0 = time.perf_counter()
        plan, realized, layers = None, 0.0, {}
        if method is not None:
            plan = allocate(model, alloc, sparsity, pattern, calib, options=aopts) if alloc != "uniform" else None
            t_alloc = time.perf_counter() - t0
            result = prune(model, method, sparsity, pattern, calib, layer_sparsity=plan, method_options=mopts, progress=False)
            realized = result.sparsity
            layers = {"error_mean": sum(r.error for r in result.layers.values()) / len(result.layers)}
        seconds = time.perf_counter() - t0
        ppl = evaluate.perplexity(model, windows)
        row = {"name": name, "method": method, "method_options": mopts, "pattern": pattern, "sparsity": sparsity,
               "allocation": alloc, "allocation_options": aopts, "realized": realized, "ppl": ppl,
               "seconds": seconds, "alloc_seconds": t_alloc if method else 0.0, **layers,
               "settings": {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
                            "eval_seqlen": args.eval_seqlen, "threads": torch.get_num_threads()}}
        if plan:
            row["plan_range"] = [min(plan.values()), max(plan.values())]
        with Path(args.out).open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def done_keys(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {f"{r['name']}|{r['pattern']}|{r['sparsity']}" for r in rows}


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    levels = [("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7), ("2:4", None)]
    names = list(dict.fromkeys(r["name"] for r in rows if r["name"] != "dense"))
    ppl = {(r["name"], r["pattern"], r["sparsity"]): r["ppl"] for r in rows}
    dense = ppl.get(("dense", "unstructured", 0.0))
    head = "| pipeline | 50% | 60% | 70% | 2:4 |\n|---|---|---|---|---|\n"
    lines = [f"| dense | {dense:.2f} | | | |" if dense else ""]
    for n in names:
        cells = [f"{ppl[(n, p, s)]:.2f}" if (n, p, s) in ppl else "-" for p, s in levels]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return head + "\n".join(x for x in lines if x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker", type=int)
    ap.add_argument("--out", default="bench/results/allocation.jsonl")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--only", help="comma-separated keys name|pattern|sparsity to run, in this order")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.out)))
        return
    if args.worker is not None:
        worker(args.worker, args)
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--worker", str(i)])
             for i in range(args.workers)]
    for p in procs:
        p.wait()
    print(table(Path(args.out)))


if __name__ == "__main__":
    main()
