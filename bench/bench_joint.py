"""Weight + activation sparsity together on SmolLM2-135M: perplexity and greedy decode tokens/s, same run.

    python bench/bench_joint.py --weight-sparsity 0.5 --activation-sparsities 0.4,0.5 --new-tokens 32

The model is pruned once (Wanda, unstructured, --calib windows), then TEAL thresholds are calibrated on the PRUNED
model. Perplexity on --eval-windows held-out windows: dense, pruned, pruned + thresholds. Decode (batch 1, the
same prompt, interleaved rounds): the pruned weights run densely ("dense"), packed by weight sparsity only
("packed", SparseLinear), thresholds only over dense columns ("act", ThresholdedLinear), and both at once
("joint", ThresholdedLinear over the bitmask-packed W.T: a skipped input skips its column, a kept one reads only
the column's kept weights). The lm_head stays dense in all of them.
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
from sparsecraft.api import prune  # noqa: E402
from sparsecraft.evaluate import perplexity  # noqa: E402
from sparsecraft.models import load_model  # noqa: E402
from sparsecraft.modules import sparsify_model_  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weight-sparsity", type=float, default=0.5)
    p.add_argument("--activation-sparsities", default="0.4,0.5")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib", type=int, default=16, help="calibration windows of --seqlen tokens (prune + thresholds)")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(None)
    calib = data.calibration_data(tok, "shakespeare", args.calib,
                                     args.seqlen, 0)
    windows = data.evaluation_data(tok, "shakespeare", args.seqlen,
                                args.eval_windows)
    print(f"threads={torch.get_num_threads()} calibration={args.calib}x{args.seqlen} eval={args.eval_windows}x"
          f"{args.seqlen} new_tokens={args.new_tokens} rounds={args.rounds}", flush=True)
    dense_ppl = perplexity(model, windows)
    result = prune(model, "wanda", args.weight_sparsity, "unstructured", calib, progress=False)
    pruned_ppl = perplexity(model, windows)
    print(f"perplexity: dense {dense_ppl:.2f}  wanda {args.weight_sparsity:.0%} {pruned_ppl:.2f}", flush=True)
    stats = measure(model, calib)
    packed = copy.deepcopy(model)
    sparsify_model_(packed, result.masks, "unstructured")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    for s in (float(v) for v in args.activation_sparsities.split(",")):
        specs = calibrate(stats, s, "teal")
        with attach(model, specs):
            joint_ppl = perplexity(model, windows)
        act, joint = copy.deepcopy(model), copy.deepcopy(model)
        swap_linears_(act, specs)
        swap_linears_(joint, specs, result.masks)
        med, outs = race({"dense": model, "packed": packed, "act": act, "joint": joint}, ids, args.new_tokens,
                         args.rounds)
        same = int((outs["act"] == outs["joint"]).sum())
        print(f"weights {args.weight_sparsity:.0%} + activations {s:.0%}: ppl {joint_ppl:.2f} | tok/s dense "
              f"{med['dense']:.1f} packed {med['packed']:.1f} ({med['packed'] / med['dense']:.2f}x) act "
              f"{med['act']:.1f} ({med['act'] / med['dense']:.2f}x) joint {med['joint']:.1f} "
              f"({med['joint'] / med['dense']:.2f}x) | same tokens joint vs act {same}/{args.new_tokens}", flush=True)
        del act, joint


if __name__ == "__main__":
    main()
