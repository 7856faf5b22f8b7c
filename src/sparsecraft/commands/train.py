"""``sparsecraft finetune``: masked fine-tuning of a pruned checkpoint, with SquareHead distillation.

    sparsecraft prune --output runs/prune                     # HF checkpoint + masks.safetensors + plan.json
    sparsecraft finetune runs/prune --steps 100 --output runs/finetune

The masks of the pruned checkpoint are fixed: the output has exactly the same zeros (checked before writing).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from sparsecraft import data, evaluate
from sparsecraft.checkpoint import load_masks, save_masks
from sparsecraft.models import load_model, parse_dtype
from sparsecraft.training import FinetuneConfig, MaskState, masked_finetune


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pruned checkpoint with its masks fixed (+ distillation)",
                       description="Fine-tune the output of `sparsecraft prune` with its keep-masks fixed: "
                                   "next-token loss plus SquareHead distillation from the dense teacher. The "
                                   "sparsity is exactly unchanged.")
    p.add_argument("pruned", help="directory written by `sparsecraft prune` (HF checkpoint + masks.safetensors)")
    p.add_argument("--teacher", help="dense teacher: HF id, directory or .gguf (default: the model in the pruned "
                                     "run's plan.json); 'none' = no distillation")
    p.add_argument("--text", default="shakespeare", help="training text: file, folder, or 'shakespeare' "
                                                        "(its calibration works)")
    p.add_argument("--eval", default="shakespeare", help="evaluation text (default: held-out Shakespeare)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4, dest="batch_size")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0, dest="weight_decay")
    p.add_argument("--distill-weight", type=float, default=1.0, dest="distill_weight")
    p.add_argument("--task-weight", type=float, default=1.0, dest="task_weight")
    p.add_argument("--train-embeddings", action="store_true", dest="train_embeddings",
                   help="also train the input embeddings (tied to the LM head in many models)")
    p.add_argument("--eval-windows", type=int, default=16, dest="eval_windows", help="0 = skip perplexity")
    p.add_argument("--eval-seqlen", type=int, default=512, dest="eval_seqlen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="runs/finetune")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def teacher_spec(args: argparse.Namespace, pruned: Path) -> str | None:
    """'none' -> None; explicit --teacher; else the model named in the pruned run's plan.json."""
    if args.teacher is not None:
        return None if args.teacher.lower() == "none" else args.teacher
    plan = pruned / "plan.json"
    if not plan.is_file():
        raise ValueError(f"{pruned} has no plan.json to name the dense teacher; pass --teacher MODEL or --teacher none")
    return json.loads(plan.read_text()).get("model", "default")


def run(args: argparse.Namespace) -> int:
    pruned, out = Path(args.pruned), Path(args.output)
    if not (pruned / "masks.safetensors").is_file():
        raise ValueError(f"{pruned} has no masks.safetensors; pass a directory written by `sparsecraft prune`")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"output directory {out} is not empty; pass --overwrite or choose another --output")
    config = FinetuneConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                            warmup_steps=max(args.steps // 10, 1), task_weight=args.task_weight,
                            distill_weight=args.distill_weight)
    torch.manual_seed(args.seed)
    dtype = parse_dtype(args.dtype)
    model, tok = load_model(str(pruned), dtype, args.device)
    masks = load_masks(pruned / "masks.safetensors")
    spec = teacher_spec(args, pruned)
    teacher = load_model(None if spec == "default" else spec, dtype, args.device)[0] if spec is not None else None
    state = MaskState(model, keep=masks)
    zeros = state.zeros()
    if not args.train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    tokens = data.tokenize(tok, data.read_text(args.text, "calib"))
    train = data.calibration_windows(tokens, args.steps * args.batch_size, args.seqlen, seed=args.seed + 1)
    windows = None
    if args.eval_windows:
        windows = data.eval_windows(data.tokenize(tok, data.read_text(args.eval, "eval")), args.eval_seqlen,
                                    args.eval_windows)
    before = evaluate.perplexity(model, windows) if windows is not None else None
    every = max(args.steps // 10, 1)
    records = masked_finetune(model, state, list(train.split(args.batch_size)), config, teacher,
                              log=lambda r: print(f"step {int(r['step'])}: loss {r['loss']:.4f}", flush=True)
                              if int(r["step"]) % every == 0 else None)
    after = evaluate.perplexity(model, windows) if windows is not None else None
    if state.zeros() != zeros:
        raise AssertionError("the masks changed during fine-tuning; please report this bug")
    state.remove()  # plain modules again; pruned weights stay exactly zero
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    save_masks(masks, out / "masks.safetensors")
    summary = {"pruned": str(pruned), "teacher": spec, "perplexity_before": before, "perplexity_after": after,
               "pruned_weights": sum(zeros.values()), "steps": args.steps, "last": records[-1]}
    (out / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    if before is not None:
        print(f"perplexity {before:.3f} -> {after:.3f}; {sum(zeros.values())} pruned weights unchanged")
    print(f"wrote {out}/ (Hugging Face checkpoint, masks.safetensors, finetune.json)")
    return 0
