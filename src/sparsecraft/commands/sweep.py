"""``sparsecraft sweep``: perplexity against sparsity for several methods and patterns, the knee, per-block
sensitivity; writes sweep.json, sweep.md and plots/*.png."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from sparsecraft import data, evaluate
from sparsecraft import sweep as sw
from sparsecraft.allocation import ALLOCATIONS
from sparsecraft.methods import METHODS
from sparsecraft.models import context_length, load_model, parse_dtype
from sparsecraft.patterns import check_sparsity, parse_pattern


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="quality vs sparsity for several methods/patterns, knee, block sensitivity",
                       description="Prune at each sparsity (and each N:M pattern once), measure perplexity, find "
                                   "the essential-sparsity knee, and optionally the perplexity with only one block "
                                   "pruned. Writes sweep.json, sweep.md and plots/quality.png, plots/sensitivity.png.")
    p.add_argument("--model", help="Hugging Face id, local HF directory, or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--methods", default="wanda,sparsegpt", help="comma-separated methods (default wanda,sparsegpt)")
    p.add_argument("--patterns", default="unstructured,2:4", help="comma-separated patterns (default unstructured,2:4)")
    p.add_argument("--sparsities", default="0.1:0.9:0.1",
                   help="comma-separated values or start:stop:step, inclusive (default 0.1:0.9:0.1)")
    p.add_argument("--allocation", default="uniform", help=f"per-layer plan: {' | '.join(ALLOCATIONS)}")
    p.add_argument("--calib", default="shakespeare", help="calibration text (default: the corpus' calibration works)")
    p.add_argument("--eval", default="shakespeare", help="evaluation text (default: held-out works)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=256, help="calibration tokens per window (default 256)")
    p.add_argument("--eval-windows", type=int, default=8, dest="eval_windows", help="evaluation windows (default 8)")
    p.add_argument("--eval-seqlen", type=int, default=512, dest="eval_seqlen", help="tokens per eval window")
    p.add_argument("--sensitivity", action="store_true", help="also prune one block at a time")
    p.add_argument("--sensitivity-sparsity", type=float, default=0.7, dest="sensitivity_sparsity")
    p.add_argument("--sensitivity-method", default="wanda", dest="sensitivity_method")
    p.add_argument("--batch-size", type=int, default=8, dest="batch_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="runs/sweep", help="output directory (default runs/sweep)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)


def parse_sparsities(text: str) -> list[float]:
    """"0.1,0.5" or "0.1:0.9:0.1" (inclusive) -> sorted unique values, each checked to be in [0, 1)."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(round((stop - start) / step))
            values = [round(start + i * step, 6) for i in range(n + 1)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sparsities {text!r}: give comma-separated values such as 0.5,0.7 or start:stop:step "
                         f"such as 0.1:0.9:0.1") from None
    if not values:
        raise ValueError("--sparsities is empty; give e.g. 0.1:0.9:0.1")
    return sorted({check_sparsity(v) for v in values})


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str], list[float]]:
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown methods {bad}; valid methods: {', '.join(sorted(METHODS))}")
    patterns = [str(parse_pattern(p)) for p in args.patterns.split(",") if p.strip()]
    if args.allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {args.allocation!r}; valid allocations: {', '.join(ALLOCATIONS)}")
    for name in ("nsamples", "seqlen", "eval_windows", "eval_seqlen", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_sparsity(args.sensitivity_sparsity)
    return methods, patterns, parse_sparsities(args.sparsities)


def run(args: argparse.Namespace) -> int:
    methods, patterns, sparsities = check_args(args)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(f"output directory {out} is not empty; pass --overwrite or choose another --output")
        shutil.rmtree(out)
    calib_text, eval_text = data.read_text(args.calib, "calib"), data.read_text(args.eval, "eval")
    model, tok = load_model(None if args.model in (None, "default") else args.model, parse_dtype(args.dtype),
                            args.device)
    ctx = context_length(model)
    if ctx is not None and max(args.seqlen, args.eval_seqlen) > ctx:
        raise ValueError(f"a window is longer than the model's context ({ctx} tokens); lower --seqlen/--eval-seqlen")
    calib = data.calibration_windows(data.tokenize(tok, calib_text), args.nsamples, args.seqlen, args.seed)
    windows = data.eval_windows(data.tokenize(tok, eval_text), args.eval_seqlen, args.eval_windows)
    dense_ppl = evaluate.perplexity(model, windows)
    print(f"dense perplexity {dense_ppl:.2f}")
    rows = sw.sweep(model, calib, windows, methods, patterns, sparsities, args.allocation,
                    batch_size=args.batch_size, seed=args.seed)
    knee_of = sw.knees(rows)
    sens = sw.block_sensitivity(model, calib, windows, args.sensitivity_sparsity, args.sensitivity_method,
                                args.batch_size) if args.sensitivity else []
    out.mkdir(parents=True, exist_ok=True)
    images = sw.plots(rows, knee_of, dense_ppl, sens, out / "plots")
    body = {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "dense_ppl": dense_ppl,
            "points": rows, "knee": knee_of, "sensitivity": sens, "plots": [f"plots/{n}" for n in images]}
    (out / "sweep.json").write_text(json.dumps(body, indent=2) + "\n")
    table = sw.markdown(rows, knee_of, dense_ppl, sens)
    (out / "sweep.md").write_text(table + "".join(f"\n![{n}](plots/{n})\n" for n in images))
    print(table)
    print(f"wrote {out}/ (sweep.json, sweep.md, plots/)")
    return 0
