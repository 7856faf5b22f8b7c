"""``sparsecraft prune``: prune a model (the embedded default without arguments), evaluate, save, report."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from sparsecraft import data, evaluate, report
from sparsecraft.api import allocate, prune
from sparsecraft.checkpoint import PACKED_FILE, save_masks, save_packed
from sparsecraft.config import RunConfig, read_plan
from sparsecraft.engine.resume import ResumeState
from sparsecraft.io import atomic_write_bytes
from sparsecraft.memory import PeakMemory
from sparsecraft.models import context_length, load_model, parse_dtype

PARTIAL = ".partial"
STAGING = ".staging"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a causal LM, evaluate it and write a checkpoint + report",
                       description="Prune a causal LM (default: SmolLM2-135M on the Shakespeare corpus), evaluate "
                                   "perplexity, and write a Hugging Face checkpoint, masks, a packed sparse "
                                   "checkpoint and a report. Settings: flags > --plan file > defaults.")
    p.add_argument("--model", help="Hugging Face id, local HF directory, or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--method", help="magnitude | random | wanda | sparsegpt (default: wanda)")
    p.add_argument("--sparsity", type=float, help="fraction of weights set to zero, in [0, 1) (default 0.5)")
    p.add_argument("--pattern", help="unstructured | N:M such as 2:4 | block such as 4x4 (default: unstructured)")
    p.add_argument("--calib", help="calibration text: file, folder of .txt, or 'shakespeare' (default)")
    p.add_argument("--eval", help="evaluation text: file, folder, or 'shakespeare' (default: held-out works)")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 64)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default 512)")
    p.add_argument("--eval-windows", type=int, dest="eval_windows", help="evaluation windows, 0 = skip (default 16)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:0, ... (default cpu)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="calibration windows per forward (default 8)")
    p.add_argument("--dampening", type=float, help="sparsegpt: dampening fraction (default 0.01)")
    p.add_argument("--allocation", help="per-layer sparsity plan: uniform | erk | owl | search (default uniform); "
                                        "options via the plan file's 'allocation_options'")
    p.add_argument("--plan", help="YAML/JSON file with any of these settings, plus 'layers' (fqn -> sparsity), "
                                  "'include' and 'exclude' (fnmatch patterns on module names)")
    p.add_argument("--output", default="runs/prune", help="output directory (default runs/prune)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    settings: dict[str, Any] = read_plan(args.plan) if args.plan else {}
    for name in ("model", "method", "sparsity", "pattern", "calib", "eval", "nsamples", "seqlen", "eval_windows",
                 "seed", "device", "dtype", "batch_size", "allocation"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.dampening is not None:
        settings["method_options"] = {**settings.get("method_options", {}), "dampening": args.dampening}
    return RunConfig.from_dict(settings)


def layer_plan(model: torch.nn.Module, cfg: RunConfig, calib: torch.Tensor) -> dict[str, float]:
    """cfg.layers, on top of the allocation's plan (uniform keeps the engine's own per-layer rounding)."""
    if cfg.allocation == "uniform":
        return dict(cfg.layers)
    opts = dict(cfg.allocation_options)
    bounds = {k: float(opts.pop(k)) for k in ("min_sparsity", "max_sparsity") if k in opts}
    plan = allocate(model, cfg.allocation, cfg.effective_sparsity, cfg.pattern, calib, include=cfg.include or None,
                    exclude=cfg.exclude or None, options=opts, seed=cfg.seed, batch_size=cfg.batch_size,
                    device=cfg.device, **bounds)
    return {**plan, **cfg.layers}


def prepare_output(out: Path, overwrite: bool, resume: bool) -> None:
    if resume:
        if not (out / PARTIAL / "progress.json").is_file():
            raise ValueError(f"nothing to resume in {out} (no unfinished run there); drop --resume")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ValueError(f"output directory {out} exists and is not empty; pass --overwrite to replace it, "
                             f"--resume to continue an interrupted run, or choose another --output")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.output)
    prepare_output(out, args.overwrite, args.resume)
    progress = not args.no_progress
    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    t_start = time.perf_counter()
    calib_text = data.read_text(cfg.calib, "calib")  # read the texts first: a bad path fails before the model loads
    eval_text = data.read_text(cfg.eval, "eval") if cfg.eval_windows else None
    model, tok = load_model(None if cfg.model == "default" else cfg.model, parse_dtype(cfg.dtype), cfg.device)
    ctx = context_length(model)
    if ctx is not None and cfg.seqlen > ctx:
        raise ValueError(f"seqlen {cfg.seqlen} is longer than the model's context ({ctx} tokens); lower --seqlen")
    calib = data.calibration_windows(data.tokenize(tok, calib_text), cfg.nsamples, cfg.seqlen, cfg.seed)
    windows = None
    if eval_text is not None:
        windows = data.eval_windows(data.tokenize(tok, eval_text), cfg.seqlen, cfg.eval_windows)
    state = ResumeState(out / PARTIAL, {"settings": cfg.to_dict(), "torch": torch.__version__})
    if "dense_ppl" not in state.extras:
        state.extras["dense_ppl"] = evaluate.perplexity(model, windows, progress=progress) if windows is not None \
            else None
    if "layer_plan" not in state.extras:
        state.extras["layer_plan"] = layer_plan(model, cfg, calib)
    with PeakMemory() as memory:
        result = prune(model, cfg.method, cfg.sparsity if cfg.sparsity is not None else cfg.effective_sparsity,
                       cfg.pattern, calib, layer_sparsity=state.extras["layer_plan"] or None, include=cfg.include or None,
                       exclude=cfg.exclude or None, method_options=cfg.method_options, device=cfg.device,
                       batch_size=cfg.batch_size, seed=cfg.seed, progress=progress, resume=state)
    sparse_ppl = evaluate.perplexity(model, windows, progress=progress) if windows is not None else None
    numbers = write_outputs(model, tok, result, cfg, out, state.extras["dense_ppl"], sparse_ppl, t_start, memory)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    print(report.terminal_table(numbers))
    print(f"\nwrote {out}/ (Hugging Face checkpoint, masks.safetensors, sparse/{PACKED_FILE}, report.md)")
    return 0


def write_outputs(model, tok, result, cfg: RunConfig, out: Path, dense_ppl, sparse_ppl, t_start: float,
                  memory: PeakMemory) -> dict:
    """Everything goes to a staging folder first and is renamed into place; report.json comes last."""
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "sparse").mkdir(parents=True)
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    save_masks(result.masks, staging / "masks.safetensors")
    sizes = save_packed(model, result.masks, result.pattern, staging / "sparse" / PACKED_FILE)
    model.config.to_json_file(staging / "sparse" / "config.json")
    atomic_write_bytes(staging / "plan.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    zeros = sum(int((~m).sum()) for m in result.masks.values())
    numbers = {
        "target_sparsity": cfg.effective_sparsity,
        "perplexity": {"dense": dense_ppl, "sparse": sparse_ppl, "eval_tokens": cfg.eval_windows * cfg.seqlen},
        "parameters": {"total": total, "pruned_layers": sum(m.numel() for m in result.masks.values()),
                       "nonzero_after": total - zeros},
        "bytes": {"dense_checkpoint": sum(f.stat().st_size for f in staging.glob("*.safetensors")
                                          if f.name != "masks.safetensors"),
                  "packed_checkpoint": (staging / "sparse" / PACKED_FILE).stat().st_size,
                  "pruned_layers_dense": sizes["dense_bytes"], "pruned_layers_packed": sizes["packed_bytes"]},
        "time_s": {"prune": result.seconds, "total": time.perf_counter() - t_start},
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # whole process
        "prune_memory_bytes": {"peak_rss": memory.peak_rss, "added_rss": memory.added_rss,
                               "peak_cuda": memory.peak_cuda},
    }
    full = report.build(result, cfg.to_dict(), numbers)
    images = report.plots(full, staging / "plots")
    atomic_write_bytes(staging / "report.md", report.markdown(full, images).encode())
    for entry in staging.iterdir():
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    report.write_json(full, out / "report.json")  # last: its presence marks a complete output
    return full
