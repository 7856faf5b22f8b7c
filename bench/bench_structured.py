"""Structured pruning on SmolLM2-135M: perplexity vs parameters kept per axis and combined, magnitude vs
activation-aware vs learned gates at the same size, before/after a short logit distillation, and decode / prefill
speed of shrunk models vs dense.

    nice -n 10 .venv/bin/python bench/bench_structured.py --out runs/bench_structured.json
    # short (the run in docs/structured.md):
    nice -n 10 .venv/bin/python bench/bench_structured.py --fractions 0.75 --calib 8 --eval 4 --seqlen 128 \
        --only "mlp+heads magnitude,mlp+heads activation,mlp+heads wanda,mlp+heads learned" --learn-steps 16 \
        --distill-tokens 4096 --decode-tokens 16 --repeats 2 --out runs/bench_structured_short.json

Every number is measured in this run; speed is reported as ratios to the dense model measured interleaved.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from sparsecraft import data, evaluate
from sparsecraft.models import load_model
from sparsecraft.structured import ShrinkConfig, shrink
from sparsecraft.structured.distill import DistillConfig, distill
from sparsecraft.structured.gates import GateConfig

RUNS = [  # (label, axes, method, rotate)
    ("mlp", ("mlp",), "activation", False),
    ("heads", ("heads",), "activation", False),
    ("hidden", ("hidden",), "activation", False),
    ("depth", ("depth",), "activation", False),
    ("mlp+heads+hidden", ("mlp", "heads", "hidden"), "activation", False),
]
COMPARE = [  # at the 75% point: magnitude baseline vs activation-aware methods vs learned gates, same sizes
    ("mlp+heads magnitude", ("mlp", "heads"), "magnitude", False),
    ("mlp+heads activation", ("mlp", "heads"), "activation", False),
    ("mlp+heads wanda", ("mlp", "heads"), "wanda", False),
    ("mlp+heads learned", ("mlp", "heads"), "learned", False),
    ("depth learned", ("depth",), "learned", False),
    ("mlp magnitude", ("mlp",), "magnitude", False),
    ("mlp wanda", ("mlp",), "wanda", False),
    ("mlp flap", ("mlp",), "flap", False),
    ("mlp learned", ("mlp",), "learned", False),
    ("mlp+heads+hidden magnitude", ("mlp", "heads", "hidden"), "magnitude", False),
    ("mlp+heads+hidden wanda", ("mlp", "heads", "hidden"), "wanda", False),
    ("mlp+hidden slicegpt", ("mlp", "hidden"), "activation", True),
]


@torch.no_grad()
def speed(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """-> (decode tokens/s at batch 1, prefill tokens/s of the whole prompt)."""
    t = time.perf_counter()
    model(input_ids=prompt, use_cache=False)
    prefill = prompt.numel() / (time.perf_counter() - t)
    t = time.perf_counter()
    model.generate(prompt[:, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    decode = new_tokens / (time.perf_counter() - t)
    return decode, prefill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fractions", default="0.9,0.75,0.6,0.5")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows")
    ap.add_argument("--eval", type=int, default=8, help="evaluation windows")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--distill-tokens", type=int, default=32768)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="comma list of run labels to keep (default: all)")
    ap.add_argument("--learn-steps", type=int, default=64, help="gate training steps for the learned runs")
    ap.add_argument("--learn-batch", type=int, default=1, help="windows per gate training step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="runs/bench_structured.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tok = load_model(None)
    calib = data.calibration_windows(data.tokenize(tok, data.read_text("shakespeare", "calib")), args.calib,
                                     args.seqlen, seed=0)
    train = data.calibration_windows(data.tokenize(tok, data.read_text("shakespeare", "calib")),
                                     max(64, args.distill_tokens // args.seqlen), args.seqlen, seed=1)
    ev = data.eval_windows(data.tokenize(tok, data.read_text("shakespeare", "eval")), args.seqlen, args.eval)
    out: dict = {"settings": vars(args), "dense_ppl": evaluate.perplexity(dense, ev), "runs": []}
    print(f"dense ppl {out['dense_ppl']:.2f}", flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fractions = [float(f) for f in args.fractions.split(",")]
    jobs = [(f, *r) for r in RUNS for f in fractions] + [(0.75, *r) for r in COMPARE]
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    jobs = [j for j in jobs if not only or j[1] in only]
    gates = GateConfig(steps=args.learn_steps, batch_size=args.learn_batch)
    models: dict[str, torch.nn.Module] = {}
    for f, label, axes, method, rot in jobs:
        model = copy.deepcopy(dense)
        row = {"label": label, "target": f, "axes": axes, "method": method, "rotate": rot}
        try:
            res = shrink(model, calib, ShrinkConfig(params=f, axes=axes, method=method, rotate=rot, gates=gates))
            row.update(kept=res.kept_fraction, sizes=res.sizes, ppl=evaluate.perplexity(model, ev),
                       seconds=res.seconds)
            if f == 0.75 and not rot:
                models[label] = model
        except ValueError as e:
            row["error"] = str(e)
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps(out, indent=1))
    ok = [r for r in out["runs"] if r["target"] == 0.75 and r.get("label") in models]
    best = min(ok, key=lambda r: r["ppl"])
    if args.distill_tokens:  # the best 75% model, distilled on a copy (speed below is of the undistilled shapes)
        student = copy.deepcopy(models[best["label"]])
        t = time.perf_counter()
        info = distill(student, dense, train, DistillConfig(tokens=args.distill_tokens, seqlen=args.seqlen),
                       path.parent / "bench_structured_kd")
        out["distill"] = {"label": best["label"], "before": best["ppl"], "after": evaluate.perplexity(student, ev),
                          "seconds": time.perf_counter() - t, **info}
        print(json.dumps(out["distill"]), flush=True)
        del student
    shapes: dict[str, str] = {}  # one model per distinct shape: equal shapes run at equal speed
    for r in ok:
        shapes.setdefault(json.dumps(r["sizes"], sort_keys=True), r["label"])
    models = {label: models[label] for label in shapes.values()}
    prompt = ev[:1, :512] if ev.shape[1] >= 512 else data.eval_windows(
        data.tokenize(tok, data.read_text("shakespeare", "eval")), 512, 1)
    timing: dict[str, list] = {k: [] for k in ["dense", *models]}
    for _ in range(args.repeats):  # interleaved, best of repeats
        for name in timing:
            timing[name].append(speed(dense if name == "dense" else models[name], prompt, args.decode_tokens))
    best_t = {k: (max(d for d, _ in v), max(p for _, p in v)) for k, v in timing.items()}
    out["speed"] = {k: {"decode_tok_s": d, "prefill_tok_s": p, "decode_x": d / best_t["dense"][0],
                        "prefill_x": p / best_t["dense"][1]} for k, (d, p) in best_t.items()}
    print(json.dumps(out["speed"]), flush=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
