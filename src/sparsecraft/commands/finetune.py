"""``sparsecraft finetune``: masked fine-tuning of a pruned checkpoint, with SquareHead distillation.

    sparsecraft prune --output runs/prune                     # HF checkpoint + masks.safetensors + settings.json
    sparsecraft finetune runs/prune --steps 100 --output runs/finetune

The masks of the pruned checkpoint are fixed: the output has exactly the same zeros (checked before writing).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from sparsecraft import data, evaluate, report
from sparsecraft.checkpoint import load_masks, save_masks
from sparsecraft.commands.options import add_config_arguments, add_output_arguments, config_from_args
from sparsecraft.config import FinetuneRunConfig
from sparsecraft.io import StagedOutput, check_output
from sparsecraft.models import check_seqlen, load_model
from sparsecraft.training import FinetuneConfig, MaskState, masked_finetune

log = logging.getLogger("sparsecraft")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pruned checkpoint with its masks fixed (+ distillation)",
                       description="Fine-tune the output of `sparsecraft prune` with its keep-masks fixed: "
                                   "next-token loss plus SquareHead distillation from the dense teacher. The "
                                   "sparsity is exactly unchanged.")
    add_config_arguments(p, FinetuneRunConfig, positional=("pruned",))
    add_output_arguments(p, "runs/finetune")
    p.set_defaults(func=run)


def teacher_spec(cfg: FinetuneRunConfig, pruned: Path) -> str | None:
    """'none' -> None; explicit --teacher; else the model named in the pruned run's settings.json."""
    if cfg.teacher:
        return None if cfg.teacher.lower() == "none" else cfg.teacher
    settings = pruned / "settings.json"
    if not settings.is_file():
        raise ValueError(f"{pruned} has no settings.json to name the dense teacher; pass --teacher MODEL or "
                         f"--teacher none")
    return json.loads(settings.read_text()).get("model", "default")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(FinetuneRunConfig, args)
    pruned = Path(cfg.pruned)
    if not (pruned / "masks.safetensors").is_file():
        raise ValueError(f"{pruned} has no masks.safetensors; pass a folder written by `sparsecraft prune`")
    spec = teacher_spec(cfg, pruned)
    out = check_output(args.output, [cfg.pruned, cfg.calib, cfg.eval, spec], overwrite=args.overwrite)
    config = FinetuneConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            warmup_steps=max(cfg.steps // 10, 1), task_weight=cfg.task_weight,
                            distill_weight=cfg.distill_weight)
    torch.manual_seed(cfg.seed)
    train_text = data.read_text(cfg.calib, "calib")
    eval_text = data.read_text(cfg.eval, "eval") if cfg.eval_windows else None
    model, tok = load_model(str(pruned), cfg.dtype, cfg.device)
    check_seqlen(model, max(cfg.seqlen, cfg.train_seqlen))
    masks = load_masks(pruned / "masks.safetensors")
    dtype = next(model.parameters()).dtype
    teacher = load_model(spec, dtype, cfg.device)[0] if spec is not None else None
    state = MaskState(model, keep=masks)
    zeros = state.zeros()
    if not cfg.train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    train = data.calibration_windows(data.tokenize(tok, train_text), cfg.steps * cfg.batch_size, cfg.train_seqlen,
                                     seed=cfg.seed + 1)
    windows = data.eval_windows(data.tokenize(tok, eval_text), cfg.seqlen, cfg.eval_windows) if eval_text else None
    before = evaluate.perplexity(model, windows) if windows is not None else None
    every = max(cfg.steps // 10, 1)
    records = masked_finetune(model, state, list(train.split(cfg.batch_size)), config, teacher,
                              log=lambda r: log.info("step %d: loss %.4f", int(r["step"]), r["loss"])
                              if int(r["step"]) % every == 0 else None)
    after = evaluate.perplexity(model, windows) if windows is not None else None
    if state.zeros() != zeros:
        raise AssertionError("the masks changed during fine-tuning; please report this bug")
    state.remove()  # plain modules again; pruned weights stay exactly zero
    with StagedOutput(out) as stage:
        model.save_pretrained(stage.path)
        tok.save_pretrained(stage.path)
        save_masks(masks, stage.path / "masks.safetensors")
        for name in ("settings.json",):
            if (pruned / name).is_file():
                (stage.path / name).write_bytes((pruned / name).read_bytes())
        summary = {"pruned": str(pruned), "teacher": spec, "perplexity_before": before, "perplexity_after": after,
                   "pruned_weights": sum(zeros.values()), "settings": cfg.__dict__, "last": records[-1]}
        report.write_json(summary, stage.path / "finetune.json")
    if before is not None:
        print(f"perplexity {before:.3f} -> {after:.3f}; {sum(zeros.values())} pruned weights unchanged")
    log.info("wrote %s/ (Hugging Face checkpoint, masks.safetensors, finetune.json)", args.output)
    return 0
