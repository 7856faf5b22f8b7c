"""``sparsecraft sweep``: perplexity against sparsity for several methods and patterns, the knee, per-block
sensitivity; writes sweep.json, sweep.md and plots/*.png."""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict

from sparsecraft import data, evaluate, report
from sparsecraft import sweep as sw
from sparsecraft.commands.options import add_config_arguments, add_output_arguments, config_from_args
from sparsecraft.config import SweepConfig
from sparsecraft.io import StagedOutput, atomic_write_text, check_output
from sparsecraft.models import check_seqlen, load_model
from sparsecraft.patterns import check_sparsity, parse_pattern

log = logging.getLogger("sparsecraft")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="quality vs sparsity for several methods/patterns, knee, block sensitivity",
                       description="Prune at each sparsity (and each N:M pattern once), measure perplexity, find "
                                   "the essential-sparsity knee, and optionally the perplexity with only one block "
                                   "pruned. Writes sweep.json, sweep.md and plots/quality.png, plots/sensitivity.png.")
    add_config_arguments(p, SweepConfig)
    add_output_arguments(p, "runs/sweep")
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


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(SweepConfig, args)
    sparsities = parse_sparsities(cfg.sparsities)
    patterns = [str(parse_pattern(p)) for p in cfg.patterns]
    out = check_output(args.output, [cfg.model, cfg.calib, cfg.eval], overwrite=args.overwrite)
    calib_text, eval_text = data.read_text(cfg.calib, "calib"), data.read_text(cfg.eval, "eval")
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    eval_seqlen = cfg.eval_seqlen or cfg.seqlen
    check_seqlen(model, max(cfg.seqlen, eval_seqlen))
    calib = data.calibration_windows(data.tokenize(tok, calib_text), cfg.nsamples, cfg.seqlen, cfg.seed)
    windows = data.eval_windows(data.tokenize(tok, eval_text), eval_seqlen, max(cfg.eval_windows, 1))
    dense_ppl = evaluate.perplexity(model, windows)
    log.info("dense perplexity %.2f", dense_ppl)
    rows = sw.sweep(model, calib, windows, cfg.methods, patterns, sparsities, cfg.allocation,
                    batch_size=cfg.batch_size, seed=cfg.seed, log=log.info)
    knee_of = sw.knees(rows)
    sens = sw.block_sensitivity(model, calib, windows, cfg.sensitivity_sparsity, cfg.sensitivity_method,
                                cfg.batch_size, log=log.info) if cfg.sensitivity else []
    with StagedOutput(out) as stage:
        images = sw.plots(rows, knee_of, dense_ppl, sens, stage.path / "plots")
        body = {"settings": asdict(cfg), "dense_ppl": dense_ppl, "points": rows, "knee": knee_of,
                "sensitivity": sens, "plots": [f"plots/{n}" for n in images]}
        report.write_json(body, stage.path / "sweep.json")
        table = sw.markdown(rows, knee_of, dense_ppl, sens)
        atomic_write_text(stage.path / "sweep.md", table + "".join(f"\n![{n}](plots/{n})\n" for n in images))
    print(table)
    log.info("wrote %s/ (sweep.json, sweep.md, plots/)", args.output)
    return 0
