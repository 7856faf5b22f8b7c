"""``sparsecraft activations measure|calibrate|eval``: activation statistics, calibrated thresholds, perplexity curves.

    sparsecraft activations measure                                  # per-layer input statistics of SmolLM2-135M
    sparsecraft activations calibrate --method wina --sparsity 0.5   # thresholds.safetensors + per-layer plan
    sparsecraft activations calibrate --allocation greedy --sparsity 0.5
    sparsecraft activations eval --sparsities 0.25,0.4,0.5,0.6 --ppl-p 1
    sparsecraft activations eval --thresholds runs/activations/thresholds.safetensors
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from sparsecraft import data, report
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
from sparsecraft.commands.options import add_config_arguments, add_output_arguments, config_from_args
from sparsecraft.config import ActivationsConfig
from sparsecraft.engine.blocks import weight_2d
from sparsecraft.evaluate import perplexity
from sparsecraft.io import StagedOutput, check_output
from sparsecraft.models import check_seqlen, load_model

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("activations", help="measure activation sparsity, calibrate thresholds, evaluate them",
                       description="Activation sparsity of the inputs of every Linear in the blocks: measure the "
                                   "statistics, calibrate TEAL/WINA thresholds (uniform or greedy per-layer "
                                   "allocation), evaluate perplexity against sparsity and the PPL-p% sparsity.")
    add_config_arguments(p, ActivationsConfig, positional=("action",))
    add_output_arguments(p, "runs/activations")
    p.set_defaults(func=run)


def parse_sparsities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sparsities must be comma-separated numbers such as 0.25,0.5, got {text!r}") from None
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise ValueError(f"--sparsities must be values in [0, 1), got {text!r}; e.g. 0.25,0.4,0.5")
    return values


def load_inputs(cfg: ActivationsConfig):
    calib_text = data.read_text(cfg.calib, "calib")  # texts first: a bad path fails before the model loads
    eval_text = data.read_text(cfg.eval, "eval")
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    check_seqlen(model, cfg.seqlen)
    calib = data.calibration_windows(data.tokenize(tok, calib_text), cfg.nsamples, cfg.seqlen, cfg.seed)
    windows = data.eval_windows(data.tokenize(tok, eval_text), cfg.seqlen, cfg.eval_windows)
    return model, calib, windows


def plan_for(args: ActivationsConfig, model, calib, stats, target: float, costs_cache: dict) -> dict[str, float]:
    if args.allocation == "uniform":
        return {fqn: target for fqn in stats}
    if "costs" not in costs_cache:
        costs_cache["costs"] = layer_costs(model, calib[: args.cost_windows], stats, args.method,
                                           batch_size=args.batch_size)
    return greedy_allocation(costs_cache["costs"], target, per_block=args.allocation == "greedy-block")


def weights_of(model) -> dict[str, int]:
    return {fqn: weight_2d(m).numel() for fqn, m in linear_targets(model).items()}


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(ActivationsConfig, args)
    targets = parse_sparsities(cfg.sparsities) if cfg.action == "eval" else [cfg.sparsity]
    out = check_output(args.output, [cfg.model, cfg.calib, cfg.eval, cfg.thresholds], overwrite=args.overwrite)
    model, calib, windows = load_inputs(cfg)
    with StagedOutput(out) as stage:
        if cfg.action == "eval" and cfg.thresholds:
            return eval_saved(cfg, model, windows, stage.path)
        stats = measure(model, calib, cfg.batch_size)
        if cfg.action == "measure":
            return report_measure(stats, stage.path)
        if cfg.action == "calibrate":
            return do_calibrate(cfg, model, calib, windows, stats, stage.path)
        return do_eval(cfg, model, calib, windows, stats, targets, stage.path)


def report_measure(stats, out: Path) -> int:
    from sparsecraft.activation.report import measure_plot, measure_table

    rows = summarize(stats)
    report.write_json([r.to_dict() for r in rows], out / "stats.json")
    print(measure_table(rows))
    print(f"\nwrote stats.json and {measure_plot(rows, out / 'layer_stats.png').name}")
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
    report.write_json(result, out / "thresholds.json")
    print(plan_table(planned, realized, weight))
    print(f"\nperplexity dense {dense:.3f} -> {sparse:.3f} ({args.method}, {args.allocation}, model-wide "
          f"planned {result['planned']:.3f}, realized {result['realized']:.3f} on {len(windows)} eval windows)")
    print(f"wrote thresholds.safetensors, thresholds.json, {plan_plot(planned, realized, out / 'layer_sparsity.png').name}")
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
    report.write_json(result, out / "curve.json")
    print(curve_table(dense, points))
    if args.ppl_p is not None:
        print(f"\nPPL-{args.ppl_p:g}% sparsity ({args.method}, uniform): {result['ppl_p']['sparsity']:.3f}")
    print(f"wrote curve.json and {curve_plot(dense, points, out / 'perplexity_vs_sparsity.png').name}")
    return 0


def eval_saved(args, model, windows, out: Path) -> int:
    dense = perplexity(model, windows, args.batch_size)
    with load_thresholds(model, args.thresholds, record=True) as att:
        sparse = perplexity(model, windows, args.batch_size)
        realized = model_sparsity(att.realized(), weights_of(model))
    print(f"perplexity dense {dense:.3f} -> {sparse:.3f} with {args.thresholds} (realized sparsity {realized:.3f})")
    report.write_json({"dense": dense, "sparse": sparse, "realized": realized, "thresholds": args.thresholds,
                       "settings": settings(args)}, out / "eval.json")
    return 0


def settings(cfg: ActivationsConfig) -> dict:
    return asdict(cfg) | {"threads": torch.get_num_threads()}
