"""``sparsecraft shrink``: structured pruning that physically shrinks a model, with optional distillation.

    sparsecraft shrink MODEL --params 0.75 --axes mlp,heads,hidden,depth --method activation \
        --distill-tokens 65536 --output runs/s75

Writes (staging folder, renamed when complete; report.json last inside it): a plain Hugging Face checkpoint
(config.json with the new sizes, model.safetensors, tokenizer), report.json, report.md, plots/*.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from sparsecraft import data, evaluate
from sparsecraft.io import StagedOutput, atomic_write_text, check_output
from sparsecraft.models import load_model, parse_dtype
from sparsecraft.structured import ShrinkConfig, shrink
from sparsecraft.structured.importance import METHODS
from sparsecraft.structured.gates import GateConfig
from sparsecraft.structured.shrink import DEPTH_METHODS, LEARNED


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shrink", help="structured pruning: remove neurons, heads, channels, blocks (smaller dense "
                                      "model, loads with plain transformers)")
    p.add_argument("model", nargs="?", default=None, help="HF id, local directory or .gguf (default: SmolLM2-135M)")
    p.add_argument("--params", type=float, default=0.75, help="fraction of parameters to keep, in (0, 1]")
    p.add_argument("--axes", default="mlp", help="comma list of mlp, heads, hidden, depth")
    p.add_argument("--method", default="activation",
                   help=f"what to remove: {', '.join(METHODS)}, or {LEARNED} (hard-concrete gates trained by "
                        f"distillation; chooses neurons, KV groups and blocks)")
    p.add_argument("--learn-steps", type=int, default=GateConfig.steps, help="gate training steps (--method learned)")
    p.add_argument("--depth-method", default="block-influence", help=f"one of {', '.join(DEPTH_METHODS)}")
    p.add_argument("--rotate", action="store_true", help="SliceGPT rotation before removing hidden channels")
    p.add_argument("--tolerance", type=float, default=0.02, help="max distance of the realized fraction")
    p.add_argument("--calib", default="shakespeare", help="calibration text (file, folder or 'shakespeare')")
    p.add_argument("--eval", default="shakespeare", help="evaluation text")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--distill-tokens", type=int, default=0, help="logit-distillation budget (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue an interrupted distillation")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> ShrinkConfig:
    axes = tuple(a.strip() for a in args.axes.split(",") if a.strip())
    return ShrinkConfig(params=args.params, axes=axes, method=args.method, depth_method=args.depth_method,
                        rotate=args.rotate, tolerance=args.tolerance,
                        gates=GateConfig(steps=args.learn_steps, seed=args.seed))


def run(args: argparse.Namespace) -> int:
    config = _config(args)  # bad fractions / axes / methods fail here, before anything loads
    if args.distill_tokens < 0:
        raise ValueError(f"--distill-tokens must be >= 0, got {args.distill_tokens}")
    out = check_output(args.output, [args.model, args.calib, args.eval], overwrite=args.overwrite or args.resume,
                       allow_existing=args.resume)
    model, tok = load_model(args.model, parse_dtype(args.dtype))
    teacher = copy.deepcopy(model) if args.distill_tokens else None
    stream = data.tokenize(tok, data.read_text(args.calib, "calib"))
    calib = data.calibration_windows(stream, args.nsamples, args.seqlen, seed=args.seed)
    ev = data.eval_windows(data.tokenize(tok, data.read_text(args.eval, "eval")), args.seqlen, args.eval_windows)
    dense_ppl = evaluate.perplexity(model, ev)
    result = shrink(model, calib, config)
    report = {"settings": {**vars(args), "func": None}, "command": " ".join(sys.argv), "dense_ppl": dense_ppl,
              "ppl": evaluate.perplexity(model, ev), **result.as_dict(), "config": model.config.to_dict()}
    if teacher is not None:
        from sparsecraft.structured.distill import DistillConfig, distill

        train = data.calibration_windows(stream, max(args.nsamples, args.distill_tokens // args.seqlen),
                                         args.seqlen, seed=args.seed + 1)
        work = out.with_name(f".{out.name}.distill")  # Trainer checkpoints, kept for --resume
        report["distill"] = distill(model, teacher, train, DistillConfig(args.distill_tokens, args.seqlen),
                                    work, resume=args.resume)
        report["distill"]["ppl"] = evaluate.perplexity(model, ev)
    with StagedOutput(out) as stage:
        model.save_pretrained(stage.path)
        tok.save_pretrained(stage.path)
        from sparsecraft.structured.report import markdown, plots

        images = plots(report, stage.path / "plots")
        atomic_write_text(stage.path / "report.md", markdown(report, images))
        atomic_write_text(stage.path / "report.json", json.dumps(report, indent=1, default=str))
    final = report.get("distill", {}).get("ppl", report["ppl"])
    print(f"kept {result.params:,} of {result.dense_params:,} parameters ({result.kept_fraction:.1%}); "
          f"perplexity {dense_ppl:.2f} -> {final:.2f}; wrote {out}")
    return 0
