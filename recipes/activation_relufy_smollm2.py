"""ReLU-fication of SmolLM2-135M with ProSparse-style progressive L1 (a small recipe; top to bottom).

    OMP_NUM_THREADS=2 python recipes/activation_relufy_smollm2.py --steps 60 --seqlen 128 --batch 4
    OMP_NUM_THREADS=2 python recipes/activation_relufy_smollm2.py --penalty density   # DEFT-style density loss

1. swap every MLP's SiLU for ReLU (the gate's negative half becomes exact zeros; quality drops at first);
2. fine-tune on calibration windows with loss = cross-entropy + factor(step) * penalty, the penalty being the mean
   |MLP down-projection input| (ProSparse L1) or mean tanh(beta |input|) (DEFT-style density), the factor rising in
   smooth stages (ProSparseSchedule);
3. report perplexity and the exact-zero fraction of the MLP activations before, after ReLU, after training.
Tiny settings by default (2 CPU cores); a useful run needs thousands of steps and a GPU.
"""

from __future__ import annotations

import argparse

import torch

from sparsecraft import data
from sparsecraft.activation.relufy import ProSparseSchedule, exact_zero_fraction, l1_on_mlp_inputs, relufy_
from sparsecraft.evaluate import perplexity
from sparsecraft.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--penalty", choices=("l1", "density"), default="l1")
    p.add_argument("--beta", type=float, default=10.0, help="sharpness of the density penalty")
    p.add_argument("--factors", default="0.01,0.05,0.1", help="penalty factor reached at the end of each of 3 stages")
    args = p.parse_args()
    model, tok = load_model(None)
    train = data.calibration_data(tok, "shakespeare", args.steps * args.batch, args.seqlen, seed=1)
    windows = data.evaluation_data(tok, "shakespeare", 512, args.eval_windows)
    probe = windows[:1, :256]
    print(f"dense: ppl {perplexity(model, windows):.2f}, exact zeros {exact_zero_fraction(model, probe):.3f}")
    relufy_(model)
    print(f"relu:  ppl {perplexity(model, windows):.2f}, exact zeros {exact_zero_fraction(model, probe):.3f}")
    third = max(1, args.steps // 3)
    factors = tuple(float(f) for f in args.factors.split(","))
    schedule = ProSparseSchedule(steps=(third, third, args.steps - 2 * third), factors=factors)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    with l1_on_mlp_inputs(model, args.penalty, args.beta) as l1:
        for step, batch in enumerate(train.split(args.batch)):
            out = model(input_ids=batch, labels=batch, use_cache=False)
            penalty = l1.take()
            loss = out.loss + schedule.factor(step) * penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 0:
                print(f"step {step:4d} ce {out.loss.item():.3f} {args.penalty} {penalty.item():.4f} "
                      f"factor {schedule.factor(step):.3f}", flush=True)
    model.eval()
    print(f"tuned: ppl {perplexity(model, windows):.2f}, exact zeros {exact_zero_fraction(model, probe):.3f}")


if __name__ == "__main__":
    main()
