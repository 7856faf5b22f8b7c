"""``sparsecraft prune``: prune a model (the embedded default without arguments), evaluate, save, report.

Order of work, so that a bad input never costs the user anything: check the output path against every input, read
the texts, load the model and check the settings against it, and only then start writing, into a staging folder
beside the output that replaces it when complete (sparsecraft.io.StagedOutput). The resume state lives beside the
output too (``.NAME.partial``) until the run completes.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from sparsecraft import data, evaluate, lmeval, report
from sparsecraft.api import plan_prune, prune
from sparsecraft.checkpoint import PACKED_FILE, save_masks, save_packed
from sparsecraft.commands.options import add_config_arguments, add_output_arguments, config_from_args
from sparsecraft.commands.prune_streamed import layer_sparsity_of, run_streamed, use_streaming, with_local_model
from sparsecraft.config import RunConfig, read_settings
from sparsecraft.engine.reconstruct import BlockReconstruction
from sparsecraft.engine.resume import ResumeState, content_fingerprint, text_digest
from sparsecraft.hf_quantizer import complete_packed_folder
from sparsecraft.io import MARKER, StagedOutput, atomic_write_text, check_output
from sparsecraft.memory import PeakMemory
from sparsecraft.models import check_seqlen, load_model, resolve_model

log = logging.getLogger("sparsecraft")
SETTINGS_FILE = "settings.json"
SPEED_PROMPT, SPEED_TOKENS = 32, 32  # the decode-speed row: a calibration prompt, then this many greedy tokens


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a causal LM, evaluate it and write a checkpoint + report",
                       description="Prune a causal LM (default: SmolLM2-135M on the Shakespeare corpus), evaluate "
                                   "perplexity, and write a Hugging Face checkpoint, masks, a packed sparse "
                                   "checkpoint and a report. Settings: flags > --settings file > defaults.")
    add_config_arguments(p, RunConfig)
    p.add_argument("--dampening", type=float, help="sparsegpt: dampening fraction (default 0.01); a shortcut for "
                                                   "method_options: {dampening: X}")
    p.add_argument("--settings", help="YAML/JSON file with any of these settings, plus 'layer_sparsity' (fqn -> "
                                      "sparsity), 'include'/'exclude' (fnmatch patterns on module names), "
                                      "'method_options' and 'allocation_options'; an output's settings.json repeats "
                                      "its run")
    add_output_arguments(p, "runs/prune", resume=True)
    p.add_argument("--no-speed", action="store_true", dest="no_speed",
                   help="skip the short decode-speed run (tokens/s of the packed model vs the masked dense one)")
    p.add_argument("--no-stream", action="store_true", dest="no_stream",
                   help="load the whole model even when it is a local safetensors folder (which is otherwise pruned "
                        "and evaluated one block at a time)")
    p.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> RunConfig:
    settings: dict[str, Any] = read_settings(args.settings) if args.settings else {}
    if args.dampening is not None:
        settings["method_options"] = {**settings.get("method_options", {}), "dampening": args.dampening}
    return config_from_args(RunConfig, args, settings)


def partial_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def after_prune_hook(model, cfg: RunConfig, device, log: dict):
    """Block reconstruction after each block's layer-wise solve (``--reconstruct-steps N``), or nothing."""
    if cfg.reconstruct_steps <= 0:
        return None
    return BlockReconstruction(model, cfg.reconstruct_steps, cfg.reconstruct_lr, device, log, cfg.reconstruct_target)


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    inputs = [cfg.model, cfg.calib, cfg.eval, args.settings, cfg.task_path,
              *(data.parse_dataset_spec(d)[0] for d in (cfg.calib_dataset, cfg.eval_dataset) if d)]
    out = check_output(args.output, inputs, overwrite=args.overwrite, allow_existing=args.resume)
    work = partial_dir(out)
    if args.resume and not (work / "progress.json").is_file():
        raise ValueError(f"nothing to resume for {args.output} (no unfinished run beside it); drop --resume")
    if not args.resume and work.exists() and not args.overwrite:
        raise ValueError(f"an unfinished run of {args.output} exists; pass --resume to continue it or "
                         f"--overwrite to start again")
    progress = args.progress
    t_start = time.perf_counter()
    calib_text = data.source_text(None if cfg.calib_dataset else cfg.calib, cfg.calib_dataset, "calib")  # texts
    eval_text = data.source_text(None if cfg.eval_dataset else cfg.eval, cfg.eval_dataset, "eval") \
        if cfg.eval_windows else None  # first: a bad path fails before the model loads
    tasks = lmeval.check_tasks(cfg.tasks, cfg.task_path) if cfg.tasks else None  # lm-eval tasks too
    # a local or downloaded safetensors folder is pruned one block in memory at a time (commands/prune_streamed.py)
    whole = "--tasks (lm-eval) needs the whole model" if tasks else None
    cfg = with_local_model(cfg, args.no_stream, whole)
    if use_streaming(cfg, args.no_stream, whole):
        return run_streamed(args, cfg, out, work, calib_text, eval_text, t_start)
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    check_seqlen(model, cfg.seqlen)
    calib = data.calibration_windows(data.tokenize(tok, calib_text), cfg.nsamples, cfg.seqlen, cfg.seed)
    windows = data.eval_windows(data.tokenize(tok, eval_text), cfg.seqlen, cfg.eval_windows) if eval_text else None
    plan_prune(model, cfg.method, cfg.sparsity if cfg.sparsity is not None else cfg.effective_sparsity, cfg.pattern,
               layer_sparsity=cfg.layer_sparsity or None, include=cfg.include or None, exclude=cfg.exclude or None,
               method_options=cfg.method_options)  # every input checked: only now is anything written
    if not args.resume and work.exists():
        shutil.rmtree(work)  # --overwrite: the unfinished run's state goes
    fingerprint = {"settings": cfg.to_dict(), "model": content_fingerprint(None if cfg.model == "default"
                                                                           else cfg.model),
                   "calib_text": text_digest(calib_text), "eval_text": text_digest(eval_text),
                   "torch": torch.__version__}
    state = ResumeState(work, fingerprint)
    device = next(model.parameters()).device
    if "dense_ppl" not in state.extras:
        state.extras["dense_ppl"] = evaluate.perplexity(model, windows, progress=progress) if windows is not None \
            else None
    if tasks is not None and "dense_tasks" not in state.extras:  # lm-eval scores of the dense model (kept for --resume)
        state.extras["dense_tasks"] = task_scores(model, tok, cfg, tasks)
    if "layer_sparsity" not in state.extras:
        state.extras["layer_sparsity"] = layer_sparsity_of(model, cfg, calib)
    reconstruction: dict[int, dict[str, float]] = {}
    with PeakMemory() as memory:
        result = prune(model, cfg.method, cfg.sparsity if cfg.sparsity is not None else cfg.effective_sparsity,
                       cfg.pattern, calib, layer_sparsity=state.extras["layer_sparsity"] or None,
                       include=cfg.include or None, exclude=cfg.exclude or None, method_options=cfg.method_options,
                       device=device, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress, resume=state,
                       after_prune=after_prune_hook(model, cfg, device, reconstruction))
    sparse_ppl = evaluate.perplexity(model, windows, progress=progress) if windows is not None else None
    scores = {"dense": state.extras["dense_tasks"], "sparse": task_scores(model, tok, cfg, tasks)} if tasks else None
    speed = None if args.no_speed else \
        evaluate.decode_speed(model, result.masks, result.pattern, calib[:1, :SPEED_PROMPT], SPEED_TOKENS)
    with StagedOutput(out) as stage:
        numbers = write_outputs(model, tok, result, cfg, stage.path, state.extras["dense_ppl"], sparse_ppl, t_start,
                                memory, reconstruction, scores, speed)
    shutil.rmtree(work, ignore_errors=True)
    print(report.terminal_table(numbers))
    log.info("wrote %s/ (Hugging Face checkpoint, masks.safetensors, sparse/%s, report.md)", args.output, PACKED_FILE)
    return 0


def task_scores(model, tok, cfg: RunConfig, manager) -> dict[str, dict[str, float]]:
    return lmeval.run_tasks(model, tok, cfg.tasks, cfg.task_path, limit=cfg.task_limit, batch_size=cfg.batch_size,
                            seed=cfg.seed, manager=manager)


def write_outputs(model, tok, result, cfg: RunConfig, staging: Path, dense_ppl, sparse_ppl, t_start: float,
                  memory: PeakMemory, reconstruction: dict[int, dict[str, float]] | None = None,
                  tasks: dict[str, dict] | None = None, speed: dict[str, float] | None = None) -> dict:
    """Everything into the staging folder; report.json comes last."""
    (staging / "sparse").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    save_masks(result.masks, staging / "masks.safetensors")
    sizes = save_packed(model, result.masks, result.pattern, staging / "sparse" / PACKED_FILE)
    complete_packed_folder(staging / "sparse", staging)  # config (quant_method sparsecraft), tokenizer, generation
    report.write_json(cfg.to_dict(), staging / SETTINGS_FILE)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    zeros = sum(int((~m).sum()) for m in result.masks.values())
    numbers = {
        "target_sparsity": cfg.effective_sparsity,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "perplexity": {"dense": dense_ppl, "sparse": sparse_ppl, "eval_tokens": cfg.eval_windows * cfg.seqlen},
        "parameters": {"total": total, "pruned_layers": sum(m.numel() for m in result.masks.values()),
                       "nonzero_after": total - zeros},
        "bytes": {"input_model": model_file_bytes(cfg.model),
                  "dense_checkpoint": sum(f.stat().st_size for f in staging.glob("*.safetensors")
                                          if f.name != "masks.safetensors"),
                  "packed_checkpoint": (staging / "sparse" / PACKED_FILE).stat().st_size,
                  "pruned_layers_dense": sizes["dense_bytes"], "pruned_layers_packed": sizes["packed_bytes"]},
        "time_s": {"prune": result.seconds, "total": time.perf_counter() - t_start},
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # whole process
        "prune_memory_bytes": {"peak_rss": memory.peak_rss, "added_rss": memory.added_rss,
                               "peak_cuda": memory.peak_cuda},
    }
    if tasks:  # lm-eval scores: {"dense"|"sparse": {task: {metric: value}}}
        numbers["tasks"] = tasks
    if speed:  # greedy decode tokens/s, masked dense vs packed, one interleaved run on this machine
        numbers["speed"] = speed
    if reconstruction:  # block output error (relative) before and after the block reconstruction, per block
        numbers["reconstruction"] = {str(i): v for i, v in sorted(reconstruction.items())}
    full = report.build(result, cfg.to_dict(), numbers)
    images = report.plots(full, staging / "plots")
    atomic_write_text(staging / "report.md", report.markdown(full, images))
    report.write_json(full, staging / "report.json")
    assert (staging / MARKER).is_file()
    return full


def model_file_bytes(spec: str) -> int | None:
    """Bytes of the weights the user started from (.gguf file or the folder's weight files); None for hub ids."""
    where, gguf = resolve_model(None if spec == "default" else spec)
    path = Path(where)
    if gguf:
        return (path / gguf).stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
    return None
