"""SmolLM2-135M turned into an MoE (moefy, no fine-tune): perplexity at k of E experts and batch-1 decode vs dense.

    python bench/bench_moe.py --experts 8 --top-k 1,2,4 --shared 0,1 --new-tokens 32 --rounds 3

Every MLP (30 blocks, 1536 neurons) is split into --experts equal experts by balanced k-means on neuron co-activation
over the calibration windows (default corpus); --shared S of them always run. One conversion per S; k is changed
afterwards (the partition and router do not depend on k). Perplexity on the held-out works (the same windows for every
row); decode tok/s of greedy batch-1 generation, dense and MoE interleaved in the same run (median of --rounds).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import PROMPT, race  # noqa: E402

from sparsecraft import data, evaluate  # noqa: E402
from sparsecraft.models import load_model  # noqa: E402
from sparsecraft.moe.router_train import RouterTrainConfig, train_routers_  # noqa: E402
from sparsecraft.moe.moefy import MoEfyConfig, find_gated_mlps, mlp_inputs, moefy_, set_top_k_  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", default="1,2,4")
    p.add_argument("--shared", default="0,1")
    p.add_argument("--router", default="lstsq")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=0, help="router distillation steps after the training-free rows")
    p.add_argument("--train-k", type=int, default=4, help="k the routers are trained (and evaluated) at")
    p.add_argument("--train-seqlen", type=int, default=256)
    p.add_argument("--train-lr", type=float, default=1e-3)
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_model(None)
    calib = data.calibration_data(tok, "shakespeare", args.nsamples, args.seqlen, 0)
    windows = data.evaluation_data(tok, "shakespeare", args.seqlen, args.eval_windows)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        dense_ppl = evaluate.perplexity(base, windows)
    print(f"threads={torch.get_num_threads()} calib={args.nsamples}x{args.seqlen} eval={args.eval_windows}x"
          f"{args.seqlen} router={args.router} dense perplexity {dense_ppl:.2f}", flush=True)
    start = time.perf_counter()
    inputs = mlp_inputs(base, calib, list(find_gated_mlps(base)), args.max_tokens)  # shared by every conversion
    inputs_s = time.perf_counter() - start
    rows = []
    for shared in _ints(args.shared):
        ks = [k for k in _ints(args.top_k) if k <= args.experts - shared]
        model = copy.deepcopy(base)
        start = time.perf_counter()
        result = moefy_(model, calib, MoEfyConfig(args.experts, max(ks), shared, args.router,
                                                  max_tokens=args.max_tokens), inputs=inputs)
        convert_s = time.perf_counter() - start + inputs_s
        for k in ks:
            set_top_k_(model, k)
            cfg = MoEfyConfig(args.experts, k, shared, args.router)
            with torch.no_grad():
                ppl = evaluate.perplexity(model, windows)
            rates, outs = race({"dense": (base, None), "moe": (model, None)}, ids, args.new_tokens, args.rounds)
            row = {"experts": args.experts, "shared": shared, "top_k": k, "active": cfg.active_fraction,
                   "ppl": ppl, "dense_ppl": dense_ppl, "dense_tok_s": rates["dense"], "moe_tok_s": rates["moe"],
                   "speedup": rates["moe"] / rates["dense"], "convert_s": convert_s,
                   "router_recall_at_max_k": result.as_dict()["router_recall_mean"]}
            rows.append(row)
            print(f"E={args.experts} shared={shared} k={k} active={cfg.active_fraction:.3f}: perplexity {ppl:8.2f} "
                  f"(dense {dense_ppl:.2f})  decode {rates['moe']:5.1f} vs dense {rates['dense']:5.1f} tok/s = "
                  f"{row['speedup']:.2f}x  (convert {convert_s:.0f} s)", flush=True)
        if args.train_steps and args.train_k <= args.experts - shared:
            train = data.calibration_data(tok, "shakespeare", 4 * args.train_steps, args.train_seqlen, 1)
            set_top_k_(model, args.train_k)
            start = time.perf_counter()
            losses = train_routers_(model, base, train, RouterTrainConfig(args.train_steps, lr=args.train_lr))
            train_s = time.perf_counter() - start
            with torch.no_grad():
                ppl = evaluate.perplexity(model, windows)
            rows.append({"experts": args.experts, "shared": shared, "top_k": args.train_k, "trained_steps":
                         args.train_steps, "ppl": ppl, "kl_first": losses[0], "kl_last": losses[-1], "train_s": train_s})
            print(f"E={args.experts} shared={shared} k={args.train_k} after {args.train_steps} router-distillation "
                  f"steps ({train_s:.0f} s, KL {losses[0]:.3f} -> {losses[-1]:.3f}): perplexity {ppl:8.2f}", flush=True)
        del model
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
