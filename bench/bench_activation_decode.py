"""End-to-end greedy decode tokens/s of SmolLM2-135M with activation thresholds vs dense, same run, interleaved.

    python bench/bench_activation_decode.py --sparsities 0.4,0.5 --new-tokens 32 --threads 2

Thresholds (TEAL rule, uniform) come from --nsamples calibration windows of --seqlen tokens of the default corpus.
Three models decode the same prompt: dense; "hooks" = thresholds attached by forward pre-hooks (same numbers as the
fast path, dense speed); "kernel" = every block Linear swapped for ThresholdedLinear (column-skipping AVX2 kernel).
The lm_head (28M of the 135M weights) stays dense in all three.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import PROMPT, race  # noqa: E402

from sparsecraft import data  # noqa: E402
from sparsecraft.activation import attach, calibrate, measure  # noqa: E402
from sparsecraft.modules import swap_linears_  # noqa: E402
from sparsecraft.models import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0.4,0.5")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_model(None)
    calib = data.calibration_data(tok, "shakespeare", args.nsamples,
                                     args.seqlen, 0)
    stats = measure(base, calib)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    print(f"threads={torch.get_num_threads()} new_tokens={args.new_tokens} rounds={args.rounds} "
          f"calibration={args.nsamples}x{args.seqlen} tokens")
    for s in (float(v) for v in args.sparsities.split(",")):
        specs = calibrate(stats, s, "teal")
        fast = copy.deepcopy(base)
        swap_linears_(fast, specs)
        hooked = copy.deepcopy(base)
        with attach(hooked, specs):
            med, outs = race({"dense": base, "hooks": hooked, "kernel": fast}, ids, args.new_tokens, args.rounds)
        same = int((outs["hooks"] == outs["kernel"]).sum())
        print(f"sparsity {s:.2f}: dense {med['dense']:6.1f} tok/s  hooks {med['hooks']:6.1f}  kernel "
              f"{med['kernel']:6.1f}  speedup kernel/dense {med['kernel'] / med['dense']:.2f}x  same tokens as "
              f"hooks {same}/{args.new_tokens}", flush=True)
        del fast, hooked


if __name__ == "__main__":
    main()
