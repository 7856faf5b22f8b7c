"""Prune (or evaluate) a safetensors checkpoint one block at a time, without ever holding the whole model.

The model is built without weights on the meta device (accelerate's ``init_empty_weights``); the tensors outside
the blocks (embeddings, final norm, head) are loaded once; block i's tensors are read from the memory-mapped shards
(safetensors ``safe_open``) only while block i is calibrated, pruned and propagated, then written to its own output
shard and put back on the meta device before block i+1 loads. Peak memory: one block + the cached activations + the
embeddings, whatever the number of blocks.

Output folder (a normal Hugging Face checkpoint): config, generation config and tokenizer files copied,
``model-00001-of-0000N.safetensors`` (everything outside the blocks), ``model-0000{i+2}-of-0000N.safetensors``
(block i), ``model.safetensors.index.json``, and ``masks.safetensors`` (keep-masks by layer fqn, as ``sparsecraft
prune`` writes). It is built in the staging folder ``.NAME.staging`` beside the output, renamed into place at the
end; a run that dies leaves the staging folder, and ``resume=True`` continues from its last finished block:
``progress.json`` (settings fingerprint, last finished block, layer records), ``masks-<i>.safetensors`` and
``hidden-<i>.rank<r>.safetensors`` (the inputs of block i+1, keyed by global batch index, one file per rank).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from sparsecraft.engine.blocks import find_blocks
from sparsecraft.engine.capture import (Calibration, as_batches, auto_offload, capture_block_inputs, move,
                                       outside_blocks_on)
from sparsecraft.engine.distributed import DistContext, barrier, check_same_settings, gather_objects, \
    prune_block_distributed, split_batches
from sparsecraft.engine.hooks import LayerCollector
from sparsecraft.engine.driver import propagate
from sparsecraft.engine.loop import prune_block, prune_layer
from sparsecraft.engine.plan import PrunePlan, plan_prune
from sparsecraft.engine.record import LayerRecord, PruneResult
from sparsecraft.checkpoint import MASKS_META, decode_mask, packed_tensors, save_masks, tensor_digest
from sparsecraft.io import MARKER, StagedOutput, atomic_save_tensors, atomic_write_text, check_output, fsync_dir
from sparsecraft.methods import Method
from sparsecraft.patterns import Pattern

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MASKS = "masks.safetensors"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
          "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}
BlockDone = Callable[[int, PruneResult], None]


class Checkpoint:
    """A local safetensors checkpoint: which shard holds each tensor, and its shape, read from the headers only."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise ValueError(f"{self.folder} holds neither {INDEX} nor {SINGLE}; streaming needs a safetensors "
                             f"checkpoint (save the model with save_pretrained(..., safe_serialization=True))")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise ValueError(f"shard {name} named in {index} is missing from {self.folder}; copy the complete "
                                 f"checkpoint (every file the index names)")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
                        self.file_of[key] = name
            except Exception as e:  # safetensors raises its own types for a corrupt header
                raise ValueError(f"shard {path} cannot be read ({e}); the file is truncated or corrupt") from None
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.file_of.get(key) != name:
                    raise ValueError(f"{INDEX} says tensor {key} is in {name}, but that shard does not hold it; the "
                                     f"checkpoint is incomplete or its shards come from different saves")
        self.sizes = {name: (self.folder / name).stat().st_size for name in files}

    def check(self, expected: Mapping[str, tuple[int, ...]], optional: set[str]) -> None:
        """Every expected tensor present (``optional``: tied copies) with the expected shape, before any work."""
        for key, shape in expected.items():
            if key not in self.shapes:
                if key in optional:
                    continue
                raise ValueError(f"tensor {key} is missing from the checkpoint in {self.folder} (no shard holds it); "
                                 f"the checkpoint does not match its config.json")
            if self.shapes[key] != tuple(shape):
                raise ValueError(f"tensor {key} in {self.folder / self.file_of[key]} has shape "
                                 f"{list(self.shapes[key])}, but config.json implies {list(shape)}; the shard "
                                 f"belongs to another model or is corrupt")

    def load(self, keys: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read ``keys`` (CPU), one shard mapping open at a time; floating tensors cast to ``dtype`` if given."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        for name, names in by_file.items():
            with safe_open(str(self.folder / name), framework="pt") as f:  # closed -> unmapped -> leaves RSS
                for key in names:
                    t = f.get_tensor(key)
                    out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


def build_skeleton(folder: str | Path) -> nn.Module:
    """The model from its config.json, every parameter on the meta device (no memory), in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():  # parameters on meta; buffers (rotary tables) stay real
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot build the model from {folder}/config.json: {str(e).splitlines()[0][:300]}") from None
    return model.eval()


def tied_targets(model: nn.Module) -> set[str]:
    """State-dict keys that alias another tensor when the config ties them (e.g. lm_head.weight)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied)


def materialize_(module: nn.Module, prefix: str, ckpt: Checkpoint, device: torch.device | str,
                 dtype: torch.dtype | None, skip: set[str] = frozenset()) -> None:
    """Give every parameter and persistent buffer of ``module`` its tensor from the checkpoint, on ``device``."""
    names = [n for n in module.state_dict() if prefix + n not in skip]
    tensors = ckpt.load([prefix + n for n in names], dtype)
    for n in names:
        owner_name, _, leaf = n.rpartition(".")
        owner = module.get_submodule(owner_name)
        t = tensors.pop(prefix + n).to(device)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t


def release_(module: nn.Module, names: list[str] | None = None) -> None:
    """Put the parameters and persistent buffers ``names`` (default: the whole state dict) back on the meta device,
    freeing their memory; non-persistent buffers (rotary tables built at init) stay as they are."""
    for n in names if names is not None else list(module.state_dict()):
        owner_name, _, leaf = n.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(torch.empty_like(owner._parameters[leaf], device="meta"),
                                                   requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = torch.empty_like(owner._buffers[leaf], device="meta")


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


class _Model:
    """The skeleton with everything outside the blocks loaded, its blocks, and the keys each output shard holds."""

    def __init__(self, folder: str | Path, device: torch.device | str, dtype: torch.dtype | None) -> None:
        self.ckpt = Checkpoint(folder)
        self.model = build_skeleton(folder)
        self.blocks_fqn, self.blocks = find_blocks(self.model)
        self.tied = tied_targets(self.model)
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        self.ckpt.check(expected, self.tied)
        self.absent = {k for k in self.tied if k not in self.ckpt.shapes}  # written by tie_weights, not stored
        prefix = self.blocks_fqn + "."
        self.outside_keys = [k for k in expected if not k.startswith(prefix)]
        self.rest_keys = [k for k in self.outside_keys if k not in self.absent]
        self.n_files = len(self.blocks) + 1
        self.device, self.dtype = device, dtype
        materialize_(self.model, "", self.ckpt, device, dtype, skip=set(expected) - set(self.rest_keys))
        if self.absent:
            self.model.tie_weights()
        still = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(prefix)]
        if still:
            raise ValueError(f"tensors {still[:3]} are neither in the checkpoint nor tied to a stored tensor")

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_fqn}.{i}."

    def load_block(self, i: int) -> nn.Module:
        block = self.blocks[i]
        materialize_(block, self.block_prefix(i), self.ckpt, self.device, self.dtype)
        return block

    def weight_map(self) -> dict[str, str]:
        wm = {k: shard_name(1, self.n_files) for k in self.rest_keys}
        for i, block in enumerate(self.blocks):
            wm.update({self.block_prefix(i) + n: shard_name(i + 2, self.n_files) for n in block.state_dict()})
        return wm


def calibration_hash(batches: list[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class MasksOnDisk(Mapping):
    """Keep-masks read from a masks.safetensors file on access (a 7B model's masks are 6.5 GB as bool)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with safe_open(str(path), framework="pt") as f:
            self._keys = list(f.keys())
            self._shapes = json.loads((f.metadata() or {}).get(MASKS_META, "null"))

    def __getitem__(self, fqn: str) -> torch.Tensor:
        if fqn not in self._keys:
            raise KeyError(fqn)
        with safe_open(str(self.path), framework="pt") as f:
            bits = f.get_tensor(fqn)
        if self._shapes is None:  # an older file: torch.bool masks
            return bits.bool()
        return decode_mask(bits, self._shapes.get(fqn), f"{self.path}: mask {fqn}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def join_safetensors(parts: list[Path], path: Path, metadata: dict[str, str] | None = None) -> None:
    """One safetensors file from several, holding one tensor in memory at a time; written atomically. Metadata
    entries holding JSON objects (e.g. the mask shapes) are merged, unless ``metadata`` is given (then it is the
    file's metadata)."""
    entries, header, offset = [], {}, 0
    merged: dict[str, dict] = {}
    for part in parts:
        with safe_open(str(part), framework="pt") as f:
            for name, text in (f.metadata() or {}).items():
                merged.setdefault(name, {}).update(json.loads(text))
            for key in f.keys():
                sl = f.get_slice(key)
                nbytes = math.prod(sl.get_shape()) * DTYPE_BYTES[sl.get_dtype()]
                header[key] = {"dtype": sl.get_dtype(), "shape": sl.get_shape(), "data_offsets": [offset, offset + nbytes]}
                entries.append((part, key))
                offset += nbytes
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    elif merged:
        header["__metadata__"] = {name: json.dumps(d) for name, d in merged.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(head)) + head)
        for part, key in entries:
            with safe_open(str(part), framework="pt") as f:
                out.write(f.get_tensor(key).contiguous().view(torch.uint8).numpy().tobytes())
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class _Progress:
    """progress.json of the staging folder: the run's fingerprint, last finished block and layer records."""

    def __init__(self, stage: Path, fingerprint: dict[str, Any], resume: bool) -> None:
        self.path = stage / "progress.json"
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.last_block, self.records = -1, {}
        if resume and self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved["fingerprint"] != self.fingerprint:
                diff = sorted(k for k in set(saved["fingerprint"]) | set(self.fingerprint)
                              if saved["fingerprint"].get(k) != self.fingerprint.get(k))
                raise ValueError(f"the unfinished run in {stage} used different settings ({', '.join(diff)}); rerun "
                                 f"with the same settings to resume, or without resume to start again")
            self.last_block, self.records = saved["last_block"], saved["records"]

    def write(self, last_block: int, result: PruneResult, seconds: float) -> None:
        self.last_block = last_block
        body = {"fingerprint": self.fingerprint, "last_block": last_block, "seconds": seconds,
                "records": {k: v.to_dict() for k, v in result.layers.items()}}
        atomic_write_text(self.path, json.dumps(body, indent=1))


def _fingerprint(ckpt: Checkpoint, method: str, options: dict, sparsity: float, pattern: Pattern,
                 plan: dict[str, float], batches: list | None, batch_size: int, seed: int,
                 dtype: torch.dtype | None) -> dict[str, Any]:
    return {"method": method, "method_options": options, "sparsity": sparsity, "pattern": str(pattern),
            "plan": plan, "batch_size": batch_size, "seed": seed, "dtype": str(dtype),
            "calibration": calibration_hash(batches) if batches is not None else None,
            "checkpoint": ckpt.sizes}


StreamPlan = PrunePlan  # a streamed prune plans exactly as an in-memory one, on the skeleton's shapes


def plan_streaming(model: nn.Module, method: str | Method = "wanda", sparsity: float | None = 0.5,
                   pattern: str | Pattern = "unstructured", *, plan: Mapping[str, float] | None = None,
                   include: list[str] | None = None, exclude: list[str] | None = None,
                   method_options: dict[str, Any] | None = None, calibrated: bool = True) -> PrunePlan:
    """Check the arguments of ``prune_streaming`` against ``model`` (a skeleton on the meta device is enough)."""
    return plan_prune(model, method, sparsity, pattern, layer_sparsity=plan, include=include, exclude=exclude,
                      method_options=method_options, calibrated=calibrated, check_values=False)


def check_streaming(model_dir: str | Path, method: str | Method = "wanda", sparsity: float | None = 0.5,
                    pattern: str | Pattern = "unstructured", **kwargs: Any) -> tuple[nn.Module, StreamPlan]:
    """Before anything is written: the checkpoint's headers against its config (every shard present, every shape
    right) and the arguments against the model; -> (skeleton on the meta device, plan). Reads no weights."""
    ckpt = Checkpoint(model_dir)
    model = build_skeleton(model_dir)
    ckpt.check({k: tuple(v.shape) for k, v in model.state_dict().items()}, tied_targets(model))
    return model, plan_streaming(model, method, sparsity, pattern, **kwargs)


def prune_streaming(
    model_dir: str | Path,
    output_dir: str | Path,
    method: str | Method = "wanda",
    sparsity: float | None = 0.5,
    pattern: str | Pattern = "unstructured",
    calibration: Calibration | None = None,
    *,
    plan: Mapping[str, float] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    method_options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int = 8,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_block_done: BlockDone | None = None,
) -> PruneResult:
    """``sparsecraft.prune`` for a local safetensors checkpoint that is never loaded whole; writes ``output_dir``.

    Same settings and the same weights and masks as loading the model and calling ``sparsecraft.prune`` (tested with
    ``torch.equal``). ``dtype`` None keeps the stored dtypes. Under an initialised torch.distributed process group,
    every rank calibrates on its share of the batches (see engine/distributed.py) and rank 0 writes. The returned
    ``masks`` are read from ``output_dir/masks.safetensors`` on access.
    """
    ctx = DistContext.current()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else device
    out = check_output(output_dir, [model_dir], overwrite=overwrite, allow_existing=False)
    m = _Model(model_dir, device, dtype)
    sp = plan_streaming(m.model, method, sparsity, pattern, plan=plan, include=include, exclude=exclude,
                        method_options=method_options, calibrated=calibration is not None)
    name, method_obj, pattern, sparsity, per_block, lplan = (sp.name, sp.method, sp.pattern, sp.sparsity,
                                                             sp.per_block, sp.layer_sparsity)
    batches = as_batches(calibration, batch_size) if calibration is not None else None
    fp = _fingerprint(m.ckpt, name, method_options or {}, sparsity, pattern, lplan, batches, batch_size, seed, dtype)
    check_same_settings(ctx, fp)  # before any work
    stage = StagedOutput(out).path
    prog = _Progress(stage, fp, resume)
    if ctx.is_main and prog.last_block < 0:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        (stage / MARKER).write_text("written by sparsecraft; `--overwrite` may replace this folder\n")
        state = m.model.state_dict()
        atomic_save_tensors({k: state[k] for k in m.rest_keys}, stage / shard_name(1, m.n_files))
        del state
    barrier(ctx, "creating the staging folder")
    result = PruneResult(method=name, pattern=str(pattern), blocks=m.blocks_fqn)
    mine = split_batches(len(batches), ctx) if batches is not None else range(0)
    calls = []
    if mine:
        with outside_blocks_on(m.model, m.blocks_fqn, device):
            own = [batches[j] for j in mine]
            offload = auto_offload(m.model, own, device, m.dtype or torch.float32)
            calls = capture_block_inputs(m.model, m.blocks[0], own, device, offload)
    release_(m.model, m.outside_keys)  # embeddings and head are not needed again: one block at a time from here
    lasts = gather_objects(ctx, prog.last_block, "the resume check")
    if len(set(lasts)) > 1:
        raise ValueError(f"ranks see different progress in {stage} (last finished block per rank: {lasts}); resume "
                         f"needs one staging folder that every rank sees (a shared filesystem)")
    start = _restore(prog, stage, ctx, mine, calls, result)
    _run_blocks(m, per_block, lplan, calls, mine, batches is None, method_obj, pattern, seed, device, result, stage,
                prog, ctx, start, progress, on_block_done)
    if ctx.is_main:
        _finish(m, stage, out, Path(model_dir))
    barrier(ctx, "writing the output")
    result.masks = MasksOnDisk(out / MASKS)  # type: ignore[assignment]  # a read-only Mapping, loaded on access
    return result


def _restore(prog: _Progress, stage: Path, ctx: DistContext, mine: range, calls: list, result: PruneResult) -> int:
    """Records and the activations entering block ``last_block + 1`` of an unfinished run; -> that block."""
    if prog.last_block < 0:
        return 0
    for fqn, rec in prog.records.items():
        rec["shape"] = tuple(rec["shape"])
        result.layers[fqn] = LayerRecord(**rec)
    result.seconds = json.loads(prog.path.read_text()).get("seconds", 0.0)
    saved: dict[str, torch.Tensor] = {}
    for path in sorted(stage.glob(f"hidden-{prog.last_block}.rank*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            saved.update({k: f.get_tensor(k) for k in f.keys() if int(k) in mine})
    missing = [j for j in mine if str(j) not in saved]
    if missing:
        raise ValueError(f"rank {ctx.rank}: the saved activations in {stage} lack batches {missing[:5]}; resume "
                         f"needs the staging folder of every rank (a shared filesystem), or start again")
    for j, call in zip(mine, calls):
        call.hidden = saved[str(j)]
    return prog.last_block + 1


def _run_blocks(m: _Model, per_block: list[dict[str, nn.Module]], lplan: dict[str, float], calls: list,
                mine: range, data_free: bool, method: Method, pattern: Pattern, seed: int, device: torch.device | str,
                result: PruneResult, stage: Path, prog: _Progress, ctx: DistContext, start: int, progress: bool,
                on_block_done: BlockDone | None) -> None:
    for i in tqdm(range(start, len(m.blocks)), desc="pruning blocks (streamed)", unit="block",
                  disable=not progress or not ctx.is_main, initial=start, total=len(m.blocks)):
        t0 = time.perf_counter()
        block, targets = m.load_block(i), per_block[i]
        for fqn, module in targets.items():
            if not torch.isfinite(module.weight).all():
                raise ValueError(f"weight of {fqn} in {m.ckpt.file_of[fqn + '.weight']} contains NaN or inf; "
                                 f"fix the checkpoint before pruning")
        if data_free:  # magnitude, random: every rank computes the same masks, nothing to exchange
            for fqn, module in targets.items():
                keep, rec = prune_layer(fqn, module, LayerCollector(module, fqn, (), "cpu", hessian=False), method,
                                        lplan[fqn], pattern, seed)
                result.masks[fqn], result.layers[fqn] = keep, rec
        elif ctx.world > 1:
            prune_block_distributed(ctx, block, targets, lplan, calls, method, pattern, seed, device, result)
        else:
            prune_block(block, targets, lplan, calls, method, pattern, seed, device, result)
        propagate(block, calls, device)
        masks = {f: result.masks.pop(f) for f in targets}
        if ctx.is_main:
            prefix = m.block_prefix(i)
            atomic_save_tensors({prefix + n: t for n, t in block.state_dict().items()},
                                stage / shard_name(i + 2, m.n_files))
            save_masks(masks, stage / f"masks-{i}.safetensors")
        if calls:
            atomic_save_tensors({str(j): c.hidden for j, c in zip(mine, calls)},
                                stage / f"hidden-{i}.rank{ctx.rank}.safetensors")
        barrier(ctx, f"saving block {i}")  # every rank's files of block i exist before progress names it
        result.seconds += time.perf_counter() - t0
        if ctx.is_main:
            prog.write(i, result, result.seconds)
        for old in stage.glob(f"hidden-{i - 2}.rank{ctx.rank}.safetensors"):  # progress names i-1 or i: obsolete
            old.unlink()
        release_(block, list(block.state_dict()))
        if on_block_done is not None:
            on_block_done(i, result)


def _finish(m: _Model, stage: Path, out: Path, model_dir: Path) -> None:
    """Masks joined, index written, config and tokenizer copied, state removed, staging renamed into place."""
    n = len(m.blocks)
    join_safetensors([stage / f"masks-{i}.safetensors" for i in range(n)], stage / MASKS)
    wm = m.weight_map()
    total = 0
    for k in range(1, m.n_files + 1):
        with safe_open(str(stage / shard_name(k, m.n_files)), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) * DTYPE_BYTES[f.get_slice(key).get_dtype()]
                         for key in f.keys())
    atomic_write_text(stage / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    for name in COPIED:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, stage / name)
    for pattern in ("masks-*.safetensors", "hidden-*.safetensors", "progress.json"):
        for p in stage.glob(pattern):
            p.unlink()
    StagedOutput(out).commit()


@contextmanager
def _without_blocks(m: _Model) -> Iterator[nn.Module]:
    """The model with an empty block list, so that its state dict holds only what lies outside the blocks."""
    parent_fqn, _, leaf = m.blocks_fqn.rpartition(".")
    parent = m.model.get_submodule(parent_fqn)
    setattr(parent, leaf, nn.ModuleList())
    try:
        yield m.model
    finally:
        setattr(parent, leaf, m.blocks)


def save_packed_streaming(folder: str | Path, masks: Mapping[str, torch.Tensor], pattern: Pattern | str | None,
                          path: str | Path) -> dict[str, int]:
    """``checkpoint.save_packed`` of the pruned checkpoint in ``folder``, one block in memory at a time.

    ``checkpoint.packed_tensors`` packs each piece (what lies outside the blocks, then each block), so the format has
    one writer; each piece goes to a part file and the parts are joined into ``path`` (one tensor in memory at a
    time) under the metadata of the whole. Returns {"dense_bytes", "packed_bytes"} of the pruned weights."""
    path = Path(path)
    m = _Model(folder, "cpu", None)
    scratch = path.parent / f".{path.name}.parts"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    meta: dict[str, Any] = {"packed": {}, "aliases": {}, "pattern": None if pattern is None else str(pattern)}
    sizes = {"dense_bytes": 0, "packed_bytes": 0}
    digests: dict[str, str] = {}  # per-tensor sha256s, as save_packed records them
    parts: list[Path] = []

    def put(prefix: str, piece: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, int]]) -> None:
        tensors, piece_meta, piece_sizes = piece
        tensors = {prefix + k: t for k, t in tensors.items()}
        meta["packed"].update({prefix + k: v for k, v in piece_meta["packed"].items()})
        meta["aliases"].update({prefix + k: prefix + v for k, v in piece_meta["aliases"].items()})
        meta["pattern"] = meta["pattern"] or piece_meta["pattern"]
        for k in sizes:
            sizes[k] += piece_sizes[k]
        digests.update({k: tensor_digest(t) for k, t in tensors.items()})
        parts.append(scratch / f"part-{len(parts)}.safetensors")
        atomic_save_tensors(tensors, parts[-1])

    try:
        with _without_blocks(m) as outside:  # embeddings, final norm, head; a tied head becomes an alias
            put("", packed_tensors(outside, {}, pattern))
        release_(m.model, m.outside_keys)
        for i in range(len(m.blocks)):
            prefix = m.block_prefix(i)
            block = m.load_block(i)
            mine = {f.removeprefix(prefix): masks[f] for f in masks if f.startswith(prefix)}
            put(prefix, packed_tensors(block, mine, pattern))
            release_(block)
        meta["sha256"] = digests
        join_safetensors(parts, path, metadata={"sparsecraft": json.dumps(meta)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return sizes


def perplexity_streaming(model_dir: str | Path, windows: torch.Tensor, batch_size: int = 4,
                         device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                         progress: bool = False) -> float:
    """``evaluate.perplexity`` of a safetensors checkpoint, one block in memory at a time (same batches, same
    numbers: every block sees exactly the inputs it would see inside the full forward pass)."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"perplexity needs token windows of shape (n, seqlen) with n >= 1, got {tuple(windows.shape)}")
    m = _Model(model_dir, device, dtype)
    batches = [{"input_ids": w} for w in windows.split(batch_size)]
    with outside_blocks_on(m.model, m.blocks_fqn, device):
        offload = auto_offload(m.model, batches, device, m.dtype or torch.float32)
        calls = capture_block_inputs(m.model, m.blocks[0], batches, device, offload)
    returns_tuple = False
    for i in tqdm(range(len(m.blocks)), desc="perplexity (streamed)", disable=not progress, unit="block"):
        block = m.load_block(i)
        propagate(block, calls, device)
        if i == len(m.blocks) - 1:  # how the model reads a block's output: a tensor or a tuple
            with torch.no_grad():
                c = calls[0]
                returns_tuple = isinstance(block(c.hidden.to(device), *move(c.args, device),
                                                 **move(c.kwargs, device)), (tuple, list))
        release_(block, list(block.state_dict()))
    return _head_nll(m, batches, calls, returns_tuple, device)


class _Replay(nn.Module):
    """Stands in for a block during the final pass: passes hidden states through, or (the last block) returns the
    hidden states the streamed blocks computed for this batch."""

    def __init__(self, outputs: Iterator[torch.Tensor] | None, as_tuple: bool) -> None:
        super().__init__()
        self.outputs, self.as_tuple = outputs, as_tuple

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = next(self.outputs).to(hidden.device) if self.outputs is not None else hidden
        return (out,) if self.as_tuple else out


def _head_nll(m: _Model, batches: list[dict[str, torch.Tensor]], calls: list, as_tuple: bool,
              device: torch.device | str) -> float:
    """Final norm + head on the streamed hidden states, through the model's own forward (blocks replayed)."""
    originals = list(m.blocks)
    outputs = iter([c.hidden for c in calls])
    nll, count = 0.0, 0
    try:
        for j in range(len(originals)):
            m.blocks[j] = _Replay(outputs if j == len(originals) - 1 else None, as_tuple)
        with torch.no_grad(), outside_blocks_on(m.model, m.blocks_fqn, device):
            for batch in batches:
                ids = batch["input_ids"].to(device)
                logits = m.model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
                target = ids[:, 1:]  # (B, T-1)
                nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       reduction="sum").item()
                count += target.numel()
    finally:
        for j, block in enumerate(originals):
            m.blocks[j] = block
    return math.exp(nll / count)
