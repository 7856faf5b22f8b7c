"""Activation-sparsity numbers on SmolLM2-135M and the default corpus (the table of docs/activation.md).

    OMP_NUM_THREADS=1 python recipes/activation_numbers.py --out bench/results/activation_numbers.json

Settings (stated in the output): thresholds from 16 calibration windows of 512 tokens (seed 0), greedy layer costs
from 2 of those windows, perplexity on the first 8 windows of 512 tokens of the held-out works.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparsecraft import data
from sparsecraft.activation import (evaluate_plan, greedy_allocation, layer_costs, measure, ppl_p_sparsity)
from sparsecraft.evaluate import perplexity
from sparsecraft.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/activation_numbers.json")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--cost-windows", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.6")
    args = ap.parse_args()
    targets = [float(s) for s in args.sparsities.split(",")]
    t0 = time.perf_counter()
    model, tok = load_model(None)
    calib = data.calibration_data(tok, "shakespeare", args.nsamples,
                                     args.seqlen, 0)
    windows = data.evaluation_data(tok, "shakespeare", args.seqlen,
                                args.eval_windows)
    out: dict = {"settings": vars(args) | {"threads": torch.get_num_threads()}, "rows": []}

    def log(row: dict) -> None:
        row["elapsed_s"] = round(time.perf_counter() - t0, 1)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)

    dense = perplexity(model, windows)
    log({"method": "dense", "sparsity": 0.0, "perplexity": dense})
    stats = measure(model, calib)
    log({"method": "measure", "seconds": round(time.perf_counter() - t0, 1)})
    for method in ("teal", "wina"):
        for s in targets:
            p = evaluate_plan(model, stats, s, method, windows)
            log({"method": method, "sparsity": s, "planned": p.sparsity, "realized": p.realized,
                 "perplexity": p.perplexity})
    costs = layer_costs(model, calib[: args.cost_windows], stats, "teal")
    torch.save({"cost": costs.cost, "weight": costs.weight, "levels": costs.levels}, args.out + ".costs.pt")
    log({"method": "layer_costs", "done": True})
    for s in targets:
        for name, plan in (("greedy", greedy_allocation(costs, s)),
                           ("greedy-block", greedy_allocation(costs, s, per_block=True))):
            for method in ("teal", "wina") if name == "greedy" else ("teal",):
                p = evaluate_plan(model, stats, plan, method, windows)
                log({"method": f"{name}+{method}", "sparsity": s, "planned": p.sparsity, "realized": p.realized,
                     "perplexity": p.perplexity, "plan_by_kind": by_kind(plan)})
    best, points = ppl_p_sparsity(model, stats, windows, 1.0, "teal", steps=6, dense_ppl=dense)
    log({"method": "ppl-1%", "rule": "teal uniform", "sparsity": best,
         "points": [[q.sparsity, q.perplexity] for q in points]})


def by_kind(plan: dict[str, float]) -> dict[str, float]:
    kinds: dict[str, list[float]] = {}
    for fqn, s in plan.items():
        kinds.setdefault(fqn.rsplit(".", 1)[-1], []).append(s)
    return {k: round(sum(v) / len(v), 3) for k, v in kinds.items()}


if __name__ == "__main__":
    main()
