"""``sparsecraft prune`` of a local safetensors checkpoint folder, streamed: the model is never loaded whole.

The default for a local folder of safetensors weights (``--no-stream`` loads the model whole, as for hub ids, .gguf
files and the embedded default). The output folder is the in-memory path's (sparsecraft.commands.prune): Hugging
Face checkpoint (one ``model.safetensors`` below save_pretrained's 50 GB shard size, else one shard per block),
``masks.safetensors``, ``sparse/model.safetensors`` (packed), ``report.md`` / ``report.json`` (which say that the
run streamed, and its peak RSS) and ``settings.json``. Same conventions too: every input is checked before anything
is written; the resume state lives beside the output (``.NAME.partial``); the output is swapped in when complete.

Under torchrun (WORLD_SIZE > 1) the calibration is data-parallel (sparsecraft.engine.distributed): every rank runs
this command, rank 0 evaluates and writes, the other ranks exit 0 once the pruned checkpoint is written.

``.NAME.partial`` holds ``progress.json`` (the run's fingerprint; layer sparsity, the records of a finished prune and
the dense perplexity as extras) and ``hf/``: the streamed checkpoint (while pruning, its own resume state is in
``.hf.staging``), completed in place with the other outputs and renamed to the output at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from sparsecraft import data, report
from sparsecraft.api import allocate
from sparsecraft.checkpoint import PACKED_FILE
from sparsecraft.config import RunConfig
from sparsecraft.engine.distributed import DistContext, barrier, gather_objects, init_distributed
from sparsecraft.engine.record import LayerRecord, PruneResult
from sparsecraft.engine.resume import ResumeState, content_fingerprint, text_digest
from sparsecraft.engine.stream import INDEX, MASKS, SINGLE, MasksOnDisk, build_skeleton, check_streaming, \
    join_safetensors, perplexity_streaming, prune_streaming, save_packed_streaming
from sparsecraft.hf_quantizer import complete_packed_folder
from sparsecraft.io import StagedOutput, atomic_write_text
from sparsecraft.memory import PeakMemory
from sparsecraft.models import check_seqlen, hub_snapshot, parse_dtype, resolve_device
from sparsecraft.moe.prune import is_moe

log = logging.getLogger("sparsecraft")
SETTINGS_FILE = "settings.json"
ONE_FILE_BYTES = 50 * 10**9  # save_pretrained's default max_shard_size ("50GB"): below it, one model.safetensors
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def stream_reason(cfg: RunConfig, no_stream: bool, whole_model: str | None = None) -> str | None:
    """None when ``cfg.model`` is pruned streamed; else why the whole model is loaded instead (``whole_model``: the
    caller's own reason, e.g. lm-eval tasks)."""
    return settings_reason(cfg, no_stream, whole_model) or folder_reason(cfg.model)


def with_local_model(cfg: RunConfig, no_stream: bool, whole_model: str | None = None) -> RunConfig:
    """``cfg`` with a hub id replaced by its downloaded safetensors snapshot when the settings allow streaming (a
    downloaded checkpoint streams like a local one); unchanged otherwise."""
    if settings_reason(cfg, no_stream, whole_model) is None:
        snapshot = hub_snapshot(cfg.model)
        if snapshot is not None:
            log.info("streaming %s from its downloaded snapshot %s", cfg.model, snapshot)
            return dataclasses.replace(cfg, model=str(snapshot))
    return cfg


def settings_reason(cfg: RunConfig, no_stream: bool, whole_model: str | None = None) -> str | None:
    """None when the settings allow a streamed prune; else why not."""
    if no_stream:
        return "--no-stream was given"
    if whole_model:
        return whole_model
    if cfg.allocation not in ("uniform", "erk"):
        return f"allocation {cfg.allocation!r} needs the weights of every block at once"
    if cfg.reconstruct_steps > 0:
        return "--reconstruct-steps is not streamed yet"
    return None


def folder_reason(spec: str) -> str | None:
    """None when ``spec`` is a local folder of dense safetensors weights that streams; else why not."""
    path = Path(spec)
    if spec == "default" or not path.is_dir():
        return f"{spec} is not a local checkpoint folder"
    if not ((path / INDEX).is_file() or (path / SINGLE).is_file()):
        return f"{spec} holds no safetensors weights"
    if (path / SINGLE).is_file() and not (path / INDEX).is_file() and _is_packed(path / SINGLE):
        return f"{spec} is a packed sparse checkpoint"
    if is_moe(build_skeleton(path)):
        return "mixture-of-experts models are not streamed yet"
    return None


def eval_streamed(spec: str, text: str, seqlen: int, eval_windows: int, batch_size: int, device: str, dtype: str,
                  progress: bool) -> tuple[float, int]:
    """``sparsecraft eval``'s perplexity of a local safetensors folder, one block in memory at a time (the same
    number as in memory); -> (perplexity, windows)."""
    tok = _load_tokenizer(spec)
    check_seqlen(build_skeleton(spec), seqlen)
    windows = data.eval_windows(data.tokenize(tok, text), seqlen, eval_windows)
    ppl = perplexity_streaming(spec, windows, batch_size=batch_size, device=resolve_device(device),
                               dtype=parse_dtype(dtype), progress=progress)
    return ppl, windows.shape[0]


def _is_packed(file: Path) -> bool:
    try:
        with safe_open(str(file), framework="pt") as f:
            return "sparsecraft" in (f.metadata() or {})
    except Exception:  # unreadable: the in-memory loader reports it
        return True


def use_streaming(cfg: RunConfig, no_stream: bool, whole_model: str | None = None) -> bool:
    """Whether ``prune`` streams; under torchrun a run that cannot stream is refused (every rank would load the
    model and write the output)."""
    reason = stream_reason(cfg, no_stream, whole_model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if reason is not None and world > 1:
        raise ValueError(f"distributed pruning (torchrun, WORLD_SIZE={world}) streams a local safetensors checkpoint "
                         f"folder, but {reason}; save the model with save_pretrained and pass --model FOLDER, or run "
                         f"one process")
    if reason is not None:
        log.debug("loading the whole model: %s", reason)
    return reason is None


def run_streamed(args: argparse.Namespace, cfg: RunConfig, out: Path, work: Path, calib_text: str,
                 eval_text: str | None, t_start: float) -> int:
    """The streamed ``prune`` (see the module docstring); ``out`` / ``work`` checked by the caller."""
    ctx = init_distributed()
    try:
        return _run(args, cfg, ctx, out, work, calib_text, eval_text, t_start)
    finally:
        if ctx.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load the tokenizer of {spec}: {str(e).splitlines()[0][:300]}; the folder "
                         f"needs its tokenizer files") from None


def layer_sparsity_of(model: nn.Module, cfg: RunConfig, calib: torch.Tensor | None) -> dict[str, float]:
    """cfg.layer_sparsity on top of the allocation's (uniform keeps the engine's own per-layer rounding); a skeleton
    and no calibration suffice for erk (shapes only). Shared by the in-memory and the streamed prune."""
    if cfg.allocation == "uniform":
        return dict(cfg.layer_sparsity)
    opts = dict(cfg.allocation_options)
    bounds = {k: float(opts.pop(k)) for k in ("min_sparsity", "max_sparsity") if k in opts}
    planned = allocate(model, cfg.allocation, cfg.effective_sparsity, cfg.pattern, calib,
                       include=cfg.include or None, exclude=cfg.exclude or None, options=opts, seed=cfg.seed,
                       batch_size=cfg.batch_size, **bounds)
    return {**planned, **cfg.layer_sparsity}


def _run(args: argparse.Namespace, cfg: RunConfig, ctx: DistContext, out: Path, work: Path, calib_text: str,
         eval_text: str | None, t_start: float) -> int:
    tok = _load_tokenizer(cfg.model)
    skeleton = build_skeleton(cfg.model)
    check_seqlen(skeleton, cfg.seqlen)
    calib = data.calibration_windows(data.tokenize(tok, calib_text), cfg.nsamples, cfg.seqlen, cfg.seed)
    windows = data.eval_windows(data.tokenize(tok, eval_text), cfg.seqlen, cfg.eval_windows) if eval_text else None
    sparsity = cfg.sparsity if cfg.sparsity is not None else cfg.effective_sparsity
    layer_sparsity = layer_sparsity_of(skeleton, cfg, None)
    options = dict(plan=layer_sparsity or None, include=cfg.include or None, exclude=cfg.exclude or None,
                   method_options=cfg.method_options)
    check_streaming(cfg.model, cfg.method, sparsity, cfg.pattern, **options)  # every input checked: now write
    device, dtype = resolve_device(cfg.device), parse_dtype(cfg.dtype)
    if ctx.is_main and not args.resume and work.exists():
        shutil.rmtree(work)  # --overwrite: the unfinished run's state goes
    barrier(ctx, "clearing the unfinished run")
    fingerprint = {"settings": cfg.to_dict(), "model": content_fingerprint(cfg.model),
                   "calib_text": text_digest(calib_text), "eval_text": text_digest(eval_text),
                   "torch": torch.__version__, "streaming": True}
    state = ResumeState(work, fingerprint)
    hf = work / "hf"
    if ctx.is_main and not (work / "progress.json").is_file():
        state.write_progress({})  # from now on --resume continues this run
    done = state.extras.get("pruned")
    if done is not None and (hf / MASKS).is_file():  # the prune finished before the interruption
        result = _result_of(done, hf)
    else:
        with PeakMemory() as memory:
            result = prune_streaming(cfg.model, hf, cfg.method, sparsity, cfg.pattern, calib, **options,
                                     device=device, dtype=dtype, batch_size=cfg.batch_size, seed=cfg.seed,
                                     resume=args.resume, overwrite=True, progress=args.progress)
        peaks = gather_objects(ctx, memory.peak_rss, "the peak memory")
        done = {"method": result.method, "pattern": result.pattern, "blocks": result.blocks,
                "seconds": result.seconds, "layers": {k: v.to_dict() for k, v in result.layers.items()},
                "memory": {"peak_rss": memory.peak_rss, "added_rss": memory.added_rss,
                           "peak_cuda": memory.peak_cuda, "peak_rss_per_rank": peaks}}
        if ctx.is_main:
            state.extras["pruned"] = done
            state.write_progress({})
    if not ctx.is_main:
        return 0  # rank 0 evaluates and writes
    if "dense_ppl" not in state.extras:
        state.extras["dense_ppl"] = perplexity_streaming(cfg.model, windows, device=device, dtype=dtype,
                                                         progress=args.progress) if windows is not None else None
        state.write_progress({})
    sparse_ppl = perplexity_streaming(hf, windows, device=device, dtype=dtype, progress=args.progress) \
        if windows is not None else None
    full = _complete(hf, cfg, skeleton, result, state.extras["dense_ppl"], sparse_ppl, done["memory"], ctx, dtype,
                     t_start)
    stage = StagedOutput(out)
    shutil.rmtree(stage.path, ignore_errors=True)
    os.replace(hf, stage.path)
    stage.commit()
    shutil.rmtree(work, ignore_errors=True)
    print(report.terminal_table(full))
    log.info("wrote %s/ (Hugging Face checkpoint, masks.safetensors, sparse/%s, report.md; streamed)", args.output,
             PACKED_FILE)
    return 0


def _result_of(done: dict[str, Any], hf: Path) -> PruneResult:
    layers = {f: LayerRecord(**{**r, "shape": tuple(r["shape"])}) for f, r in done["layers"].items()}
    result = PruneResult(method=done["method"], pattern=done["pattern"], blocks=done["blocks"], layers=layers,
                         seconds=done["seconds"])
    result.masks = MasksOnDisk(hf.resolve() / MASKS)  # type: ignore[assignment]  # read on access
    return result


def one_file_(folder: Path) -> None:
    """The streamed per-block shards joined into one model.safetensors (as save_pretrained writes below 50 GB);
    safe to repeat after an interruption."""
    index = folder / INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if sum((folder / s).stat().st_size for s in shards) > ONE_FILE_BYTES:
            return
        join_safetensors([folder / s for s in shards], folder / SINGLE, metadata={"format": "pt"})
        index.unlink()  # the index goes first: shards left over without it are ignored below
    if (folder / SINGLE).is_file():
        for shard in folder.glob("model-*-of-*.safetensors"):
            shard.unlink()


def _stored_dtype(folder: Path, result: PruneResult) -> str:
    fqn = next(iter(result.layers))
    files = [folder / SINGLE] if (folder / SINGLE).is_file() else \
        [folder / json.loads((folder / INDEX).read_text())["weight_map"][f"{fqn}.weight"]]
    with safe_open(str(files[0]), framework="pt") as f:
        kind = f.get_slice(f"{fqn}.weight").get_dtype()
    return SAFETENSORS_DTYPES.get(kind, kind.lower())


def _complete(hf: Path, cfg: RunConfig, skeleton: nn.Module, result: PruneResult, dense_ppl: float | None,
              sparse_ppl: float | None, memory: dict[str, Any], ctx: DistContext, dtype: torch.dtype | None,
              t_start: float) -> dict[str, Any]:
    """The outputs next to the streamed checkpoint, as the in-memory path writes them; report.json last."""
    one_file_(hf)
    if dtype is not None:  # the weights were cast: say so in config.json
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(hf)
        config.dtype = dtype
        config.to_json_file(hf / "config.json")
    (hf / "sparse").mkdir(exist_ok=True)
    sizes = save_packed_streaming(hf, result.masks, result.pattern, hf / "sparse" / PACKED_FILE)
    complete_packed_folder(hf / "sparse", hf)  # config (quant_method sparsecraft), tokenizer, generation config
    report.write_json(cfg.to_dict(), hf / SETTINGS_FILE)
    skeleton.tie_weights()  # the skeleton's head is its own tensor until tied (a tied head is not counted twice)
    total = sum(p.numel() for p in {id(p): p for p in skeleton.parameters()}.values())
    zeros = sum(int((~m).sum()) for m in result.masks.values())
    numbers = {
        "target_sparsity": cfg.effective_sparsity,
        "dtype": _stored_dtype(hf, result),
        "perplexity": {"dense": dense_ppl, "sparse": sparse_ppl, "eval_tokens": cfg.eval_windows * cfg.seqlen},
        "parameters": {"total": total, "pruned_layers": sum(math.prod(r.shape) for r in result.layers.values()),
                       "nonzero_after": total - zeros},
        "bytes": {"input_model": sum(f.stat().st_size for f in Path(cfg.model).iterdir()
                                     if f.suffix in (".safetensors", ".bin", ".gguf")),
                  "dense_checkpoint": sum(f.stat().st_size for f in hf.glob("*.safetensors") if f.name != MASKS),
                  "packed_checkpoint": (hf / "sparse" / PACKED_FILE).stat().st_size,
                  "pruned_layers_dense": sizes["dense_bytes"], "pruned_layers_packed": sizes["packed_bytes"]},
        "time_s": {"prune": result.seconds, "total": time.perf_counter() - t_start},
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # whole process (rank 0)
        "prune_memory_bytes": {k: memory[k] for k in ("peak_rss", "added_rss", "peak_cuda")},
        "streaming": {"used": True, "world_size": ctx.world, "peak_rss": memory["peak_rss"],
                      "peak_rss_per_rank": memory["peak_rss_per_rank"]},
    }
    full = report.build(result, cfg.to_dict(), numbers)
    images = report.plots(full, hf / "plots")
    atomic_write_text(hf / "report.md", report.markdown(full, images))
    report.write_json(full, hf / "report.json")
    return full

