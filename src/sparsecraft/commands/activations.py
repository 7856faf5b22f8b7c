"""``sparsecraft activations measure|calibrate|eval``: activation statistics, calibrated thresholds, perplexity curves.

    sparsecraft activations measure                                  # per-layer input statistics of SmolLM2-135M
    sparsecraft activations calibrate --method wina --sparsity 0.5   # thresholds.safetensors + per-layer plan
    sparsecraft activations calibrate --allocation greedy --sparsity 0.5
    sparsecraft activations eval --sparsities 0.25,0.4,0.5,0.6 --ppl-p 1
    sparsecraft activations eval --thresholds runs/activations/thresholds.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsecraft import data
from sparsecraft.activation import (
    calibrate,
    evaluate_plan,
    greedy_allocation,
    layer_costs,
    linear_targets,
    load_thresholds,
    measure,
    model_sparsity,
    ppl_p_sparsity,
    save_thresholds,
    attach,
    summarize,
)
from sparsecraft.activation.thresholds import METHODS
from sparsecraft.engine.blocks import weight_2d
from sparsecraft.evaluate import perplexity
from sparsecraft.models import context_length, load_model, parse_dtype

ACTIVATION_ALLOCATIONS = ("uniform", "greedy", "greedy-block")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("activations", help="measure activation sparsity, calibrate thresholds, evaluate them",
                       description="Activation sparsity of the inputs of every Linear in the blocks: measure the "
                                   "statistics, calibrate TEAL/WINA thresholds (uniform or greedy per-layer "
                                   "allocation), evaluate perplexity against sparsity and the PPL-p% sparsity.")
    p.add_argument("action", choices=["measure", "calibrate", "eval"])
    p.add_argument("--model", help="Hugging Face id, local HF directory, or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (default float32)")
    p.add_argument("--calib", default="shakespeare", help="calibration text: file, folder or 'shakespeare'")
    p.add_argument("--eval", default="shakespeare", help="evaluation text (default: held-out works)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--eval-windows", type=int, default=8, dest="eval_windows", help="evaluation windows (default 8)")
    p.add_argument("--batch-size", type=int, default=4, dest="batch_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="teal", help=f"threshold rule: {' | '.join(METHODS)} (default teal)")
    p.add_argument("--sparsity", type=float, default=0.5, help="calibrate: model-wide target in [0, 1)")
    p.add_argument("--allocation", default="uniform",
                   help="uniform | greedy (per layer, least block error, model-wide) | greedy-block (the greedy "
                        "inside each block, every block at the target)")
    p.add_argument("--cost-windows", type=int, default=2, dest="cost_windows",
                   help="greedy: calibration windows used for the layer costs (default 2)")
    p.add_argument("--sparsities", default="0.25,0.4,0.5,0.6", help="eval: comma-separated model-wide targets")
    p.add_argument("--ppl-p", type=float, default=None, dest="ppl_p", help="eval: also find the PPL-p%% sparsity")
    p.add_argument("--thresholds", help="eval: a thresholds.safetensors written by calibrate")
    p.add_argument("--output", default="runs/activations", help="output directory (default runs/activations)")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    if args.method not in METHODS:
        raise ValueError(f"unknown --method {args.method!r}; use one of {', '.join(METHODS)}")
    if args.allocation not in ACTIVATION_ALLOCATIONS:
        raise ValueError(f"unknown --allocation {args.allocation!r}; use one of {', '.join(ACTIVATION_ALLOCATIONS)}")
    if not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}; e.g. --sparsity 0.5")
    for name in ("nsamples", "eval_windows", "cost_windows", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.thresholds and not Path(args.thresholds).is_file():
        raise ValueError(f"--thresholds {args.thresholds} does not exist; write one with `sparsecraft activations "
                         f"calibrate --output DIR` (DIR/thresholds.safetensors)")


def parse_sparsities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sparsities must be comma-separated numbers such as 0.25,0.5, got {text!r}") from None
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise ValueError(f"--sparsities must be values in [0, 1), got {text!r}; e.g. 0.25,0.4,0.5")
    return values


def load_inputs(args: argparse.Namespace):
    calib_text = data.read_text(args.calib, "calib")  # texts first: a bad path fails before the model loads
    eval_text = data.read_text(args.eval, "eval")
    model, tok = load_model(args.model, parse_dtype(args.dtype))
    ctx = context_length(model)
    if ctx is not None and args.seqlen > ctx:
        raise ValueError(f"--seqlen {args.seqlen} is longer than the model's context ({ctx}); lower --seqlen")
    calib = data.calibration_windows(data.tokenize(tok, calib_text), args.nsamples, args.seqlen, args.seed)
    windows = data.eval_windows(data.tokenize(tok, eval_text), args.seqlen, args.eval_windows)
    return model, calib, windows


def plan_for(args: argparse.Namespace, model, calib, stats, target: float, costs_cache: dict) -> dict[str, float]:
    if args.allocation == "uniform":
        return {fqn: target for fqn in stats}
    if "costs" not in costs_cache:
        costs_cache["costs"] = layer_costs(model, calib[: args.cost_windows], stats, args.method,
                                           batch_size=args.batch_size)
    return greedy_allocation(costs_cache["costs"], target, per_block=args.allocation == "greedy-block")


def weights_of(model) -> dict[str, int]:
    return {fqn: weight_2d(m).numel() for fqn, m in linear_targets(model).items()}


def run(args: argparse.Namespace) -> int:
    check_args(args)
    targets = parse_sparsities(args.sparsities) if args.action == "eval" else [args.sparsity]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model, calib, windows = load_inputs(args)
    if args.action == "eval" and args.thresholds:
        return eval_saved(args, model, windows, out)
    stats = measure(model, calib, args.batch_size)
    if args.action == "measure":
        return report_measure(stats, out)
    if args.action == "calibrate":
        return do_calibrate(args, model, calib, windows, stats, out)
    return do_eval(args, model, calib, windows, stats, targets, out)


def report_measure(stats, out: Path) -> int:
    from sparsecraft.activation.report import measure_plot, measure_table

    rows = summarize(stats)
    (out / "stats.json").write_text(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
    print(measure_table(rows))
    print(f"\nwrote {out}/stats.json and {measure_plot(rows, out / 'layer_stats.png')}")
    return 0


def do_calibrate(args, model, calib, windows, stats, out: Path) -> int:
    from sparsecraft.activation.report import plan_plot, plan_table

    plan = plan_for(args, model, calib, stats, args.sparsity, {})
    specs = calibrate(stats, plan, args.method)
    dense = perplexity(model, windows, args.batch_size)
    with attach(model, specs, record=True) as att:
        sparse = perplexity(model, windows, args.batch_size)
        realized = att.realized()
        save_thresholds(att, out / "thresholds.safetensors", args.method)
    weight = weights_of(model)
    planned = {f: s.sparsity for f, s in specs.items()}
    result = {"method": args.method, "allocation": args.allocation, "target": args.sparsity,
              "planned": model_sparsity(planned, weight), "realized": model_sparsity(realized, weight),
              "perplexity": {"dense": dense, "sparse": sparse}, "layers": planned, "layers_realized": realized,
              "settings": settings(args)}
    (out / "plan.json").write_text(json.dumps(result, indent=1) + "\n")
    print(plan_table(planned, realized, weight))
    print(f"\nperplexity dense {dense:.3f} -> {sparse:.3f} ({args.method}, {args.allocation}, model-wide "
          f"planned {result['planned']:.3f}, realized {result['realized']:.3f} on {len(windows)} eval windows)")
    print(f"wrote {out}/thresholds.safetensors, plan.json, {plan_plot(planned, realized, out / 'layer_sparsity.png')}")
    return 0


def do_eval(args, model, calib, windows, stats, targets: list[float], out: Path) -> int:
    from sparsecraft.activation.report import curve_plot, curve_table

    dense = perplexity(model, windows, args.batch_size)
    cache: dict = {}
    points = [evaluate_plan(model, stats, plan_for(args, model, calib, stats, s, cache), args.method, windows,
                            args.batch_size) for s in targets]
    result = {"dense": dense, "method": args.method, "allocation": args.allocation,
              "points": [p.__dict__ for p in points], "settings": settings(args)}
    if args.ppl_p is not None:
        best, searched = ppl_p_sparsity(model, stats, windows, args.ppl_p, args.method, dense_ppl=dense,
                                        batch_size=args.batch_size)
        result["ppl_p"] = {"p": args.ppl_p, "sparsity": best, "searched": [q.__dict__ for q in searched]}
    (out / "curve.json").write_text(json.dumps(result, indent=1) + "\n")
    print(curve_table(dense, points))
    if args.ppl_p is not None:
        print(f"\nPPL-{args.ppl_p:g}% sparsity ({args.method}, uniform): {result['ppl_p']['sparsity']:.3f}")
    print(f"wrote {out}/curve.json and {curve_plot(dense, points, out / 'perplexity_vs_sparsity.png')}")
    return 0


def eval_saved(args, model, windows, out: Path) -> int:
    dense = perplexity(model, windows, args.batch_size)
    with load_thresholds(model, args.thresholds, record=True) as att:
        sparse = perplexity(model, windows, args.batch_size)
        realized = model_sparsity(att.realized(), weights_of(model))
    print(f"perplexity dense {dense:.3f} -> {sparse:.3f} with {args.thresholds} (realized sparsity {realized:.3f})")
    (out / "eval.json").write_text(json.dumps({"dense": dense, "sparse": sparse, "realized": realized,
                                               "thresholds": args.thresholds, "settings": settings(args)}) + "\n")
    return 0


def settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"} | {"threads": torch.get_num_threads()}
