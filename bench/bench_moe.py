"""SmolLM2-135M turned into an MoE (moefy): perplexity at k of E experts vs dense and vs unstructured MLP sparsity with
the same active MLP weights, before and after the down-projection refit and router / expert distillation; and
batch-1 decode of the MoE vs dense.

    OMP_NUM_THREADS=1 python bench/bench_moe.py --configs 0:1,0:2,0:4,1:1,1:2,1:3,1:4,3:1 \\
        --train 0:4:router:300,1:4:router:300,1:3:experts:600 --json bench/results/moe.json
    python bench/bench_moe.py --decode --configs 0:4,1:3 --threads 2 --rounds 5
    OMP_NUM_THREADS=1 python bench/bench_moe.py --proxy 0,15,29 --configs 0:4,1:3,3:1

--configs lists shared:k pairs (E = --experts); one conversion per shared count, k is changed afterwards (the
partition and router do not depend on k). For every row: perplexity training-free, with the centroid router instead
of lstsq (--centroid-k), and after ``refit_down_`` (ridge --refit) for that k. Every active fraction also gets a
wanda row that prunes only the MLP Linears to the same density (calibration: the first --wanda-nsamples windows).
--train shared:k:router|experts:SECONDS distils the dense model into the refitted MoE for a wall-clock budget
(KL on --train-seqlen windows of the calibration works, seed 1). --decode times greedy batch-1 generation, dense and
MoE interleaved in one run (median of --rounds); decode speed does not depend on which neurons share an expert, so
its conversion uses only --decode-tokens calibration tokens. --proxy 0,15,29 only prints per-layer MLP output errors
(per-token top neurons vs fixed experts; see proxy_rows). Perplexity: the first --eval-windows windows of the
held-out works (the windows of docs/activation.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import PROMPT, race  # noqa: E402

from sparsecraft import data, evaluate, prune  # noqa: E402
from sparsecraft.models import load_model  # noqa: E402
from sparsecraft.modules.moe_mlp import MoEMLP  # noqa: E402
from sparsecraft.moe.moefy import MoEfyConfig, find_gated_mlps, mlp_inputs, moefy_, set_top_k_  # noqa: E402
from sparsecraft.moe.refit import refit_down_  # noqa: E402
from sparsecraft.moe.router_train import RouterTrainConfig, train_routers_  # noqa: E402


def _pairs(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]


def _log(row: dict, rows: list[dict]) -> None:
    rows.append(row)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def _moes(model: torch.nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


@torch.no_grad()
def _use_centroid_router_(model: torch.nn.Module) -> None:
    """MoEfication's router: each routed expert scored by the mean of its gate rows, no bias."""
    for m in _moes(model):
        ie = m.gate_up.shape[1] // 2
        m.router_weight.copy_(m.gate_up[:, :ie].mean(1))
        m.router_bias.zero_()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "down" in n or "router" in n}


@torch.no_grad()
def _restore_(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in saved:
            p.copy_(saved[n])


def wanda_rows(base, calib, windows, fractions, dense_ppl, rows) -> None:
    for active in sorted(fractions):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        prune(model, "wanda", 1 - active, calibration=calib, include=["*.mlp.*"], progress=False)
        ppl = evaluate.perplexity(model, windows)
        _log({"kind": "wanda-mlp", "active": active, "mlp_sparsity": 1 - active, "ppl": ppl, "dense_ppl": dense_ppl,
              "seconds": time.perf_counter() - start}, rows)
        del model


def moe_rows(base, calib, windows, inputs, args, dense_ppl, rows) -> None:
    configs = _pairs(args.configs)
    trains = [t for t in (args.train.split(",") if args.train else []) if t.strip()]
    for shared in sorted({s for s, _ in configs}):
        ks = sorted(k for s, k in configs if s == shared)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        result = moefy_(model, calib, MoEfyConfig(args.experts, max(ks), shared, "lstsq",
                                                  max_tokens=args.max_tokens), inputs=inputs)
        convert_s = time.perf_counter() - start
        original = _snapshot(model)
        for k in ks:
            active = (shared + k) / args.experts
            set_top_k_(model, k)
            row = {"kind": "moe", "experts": args.experts, "shared": shared, "top_k": k, "active": active,
                   "dense_ppl": dense_ppl, "convert_s": convert_s,
                   "router_recall_at_max_k": result.as_dict()["router_recall_mean"]}
            row["ppl"] = evaluate.perplexity(model, windows)
            if k in {int(v) for v in args.centroid_k.split(",") if v.strip()}:
                _use_centroid_router_(model)
                row["ppl_centroid"] = evaluate.perplexity(model, windows)
                _restore_(model, original)
            if args.refit:
                start = time.perf_counter()
                errors = refit_down_(model, {f: x[: args.max_tokens] for f, x in inputs.items()}, args.refit)
                row["refit_s"] = time.perf_counter() - start
                row["refit_err_before"] = sum(e[0] for e in errors.values()) / len(errors)
                row["refit_err_after"] = sum(e[1] for e in errors.values()) / len(errors)
                row["ppl_refit"] = evaluate.perplexity(model, windows)
            for spec in trains:
                s, tk, mode, seconds = spec.split(":")
                if (int(s), int(tk)) == (shared, k):
                    row.update(_train(model, base, windows, mode, float(seconds), args))
            _log(row, rows)
            _restore_(model, original)
        del model


def _train(model, base, windows, mode: str, seconds: float, args) -> dict:
    if mode not in ("router", "experts"):
        raise ValueError(f"--train mode must be router or experts, got {mode!r}")
    student = copy.deepcopy(model)  # the refitted model at this k; the conversion stays untouched for other rows
    tok_windows = data.calibration_data(args.tokenizer, "shakespeare", 512, args.train_seqlen, 1)
    config = RouterTrainConfig(steps=10_000, batch_size=args.train_batch, lr=args.train_lr,
                               expert_lr=args.expert_lr if mode == "experts" else 0.0, max_seconds=seconds)
    start = time.perf_counter()
    losses = train_routers_(student, base, tok_windows, config)
    out = {f"trained_{mode}_s": time.perf_counter() - start, f"trained_{mode}_steps": len(losses),
           f"kl_first_{mode}": losses[0], f"kl_last_{mode}": sum(losses[-5:]) / len(losses[-5:]),
           f"ppl_trained_{mode}": evaluate.perplexity(student, windows)}
    del student
    return out


@torch.no_grad()
def proxy_rows(base, calib, args, rows) -> None:
    """Per-layer relative squared MLP output error on held-out calibration tokens (the last quarter of the first
    --proxy-tokens): per-token top neurons by |a_i| ||down_i|| vs fixed experts (oracle / lstsq / centroid choice,
    gate-weighted sum, refit). Shows where the MoE loses against per-token activation sparsity."""
    mlps = find_gated_mlps(base)
    fqns = [list(mlps)[int(i)] for i in args.proxy.split(",")]
    inputs = mlp_inputs(base, calib, fqns, args.proxy_tokens)
    for fqn in fqns:
        mlp, x = mlps[fqn], inputs[fqn]
        n_fit = x.shape[0] * 3 // 4
        tmp = torch.nn.Module()
        tmp.mlp = copy.deepcopy(mlp)
        a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # (N, I)
        y = mlp.down_proj(a)  # (N, H)
        ye = y[n_fit:]
        rel = lambda yh: float((ye - yh).square().sum() / ye.square().sum())  # noqa: E731
        contrib = a[n_fit:].abs() * mlp.down_proj.weight.norm(dim=0)  # (n, I)
        for shared, k in _pairs(args.configs):
            active = (shared + k) / args.experts
            keep = torch.zeros_like(contrib).scatter_(1, contrib.topk(round(active * a.shape[1]), 1).indices, 1.0)
            row = {"kind": "proxy", "fqn": fqn, "shared": shared, "top_k": k, "active": active,
                   "neuron_oracle": rel(mlp.down_proj(a[n_fit:] * keep))}
            moefy_(tmp, calib, MoEfyConfig(args.experts, k, shared, "lstsq", max_tokens=n_fit),
                   include=["mlp"], inputs={"mlp": x[:n_fit]})
            moe, xe = tmp.mlp, x[n_fit:]
            E, _, ie = moe.down.shape
            fe = torch.stack([moe._expert(moe.gate_up[e], moe.down[e], xe) for e in range(E)], 1)  # (n, E, H)
            ys = moe._expert(moe.shared_gate_up, moe.shared_down, xe) if shared else torch.zeros_like(ye)
            pick = lambda idx, w=1.0: rel(ys + (torch.zeros(xe.shape[0], E).scatter_(1, idx, w)[..., None]  # noqa: E731
                                                * fe).sum(1))
            top = (xe @ moe.router_weight.T + moe.router_bias).topk(k, 1)
            row["expert_oracle"] = pick(fe.norm(dim=-1).topk(k, 1).indices)
            row["lstsq"] = pick(top.indices)
            row["lstsq_gate_weighted"] = pick(top.indices, torch.softmax(top.values, 1) * k)
            row["centroid"] = pick((xe @ moe.gate_up[:, :ie].mean(1).T).topk(k, 1).indices)
            refit_down_(tmp, {"mlp": x[:n_fit]}, args.refit or 0.3)
            row["refit"] = rel(moe(xe))
            tmp.mlp = copy.deepcopy(mlp)
            _log(row, rows)


def decode_rows(base, tok, args, rows) -> None:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    calib = data.calibration_data(tok, "shakespeare", 1, args.decode_tokens, 0)
    for shared, k in _pairs(args.configs):
        model = copy.deepcopy(base)
        moefy_(model, calib, MoEfyConfig(args.experts, k, shared, "lstsq", iterations=2, max_tokens=args.decode_tokens))
        rates, _ = race({"dense": (base, None), "moe": (model, None)}, ids, args.new_tokens, args.rounds)
        _log({"kind": "decode", "shared": shared, "top_k": k, "active": (shared + k) / args.experts,
              "dense_tok_s": rates["dense"], "moe_tok_s": rates["moe"], "speedup": rates["moe"] / rates["dense"],
              "threads": torch.get_num_threads(), "loadavg": os.getloadavg()[0]}, rows)
        del model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--configs", default="0:1,0:2,0:4,1:1,1:2,1:3,1:4", help="shared:k pairs")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens per MLP: clustering, router, refit")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--refit", type=float, default=0.3, help="refit_down_ ridge; 0 = no refit rows")
    p.add_argument("--centroid-k", default="4", help="k values that also get a centroid-router row")
    p.add_argument("--wanda", type=int, default=1, help="1 = unstructured wanda MLP rows at the same active fractions")
    p.add_argument("--wanda-nsamples", type=int, default=8)
    p.add_argument("--train", default="", help="shared:k:router|experts:SECONDS, comma-separated")
    p.add_argument("--train-seqlen", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-lr", type=float, default=2e-3)
    p.add_argument("--expert-lr", type=float, default=3e-5)
    p.add_argument("--decode", action="store_true", help="only the decode race (dense vs MoE per config)")
    p.add_argument("--proxy", default="", help="only the per-layer error analysis on these block indices, e.g. 0,15,29")
    p.add_argument("--proxy-tokens", type=int, default=8192)
    p.add_argument("--decode-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_model(None)
    args.tokenizer = tok
    rows: list[dict] = []
    print(f"threads={torch.get_num_threads()} loadavg={os.getloadavg()}", flush=True)
    if args.decode:
        decode_rows(base, tok, args, rows)
    elif args.proxy:
        proxy_rows(base, data.calibration_data(tok, "shakespeare", args.nsamples, args.seqlen, 0), args, rows)
    else:
        calib = data.calibration_data(tok, "shakespeare", args.nsamples, args.seqlen, 0)
        windows = data.evaluation_data(tok, "shakespeare", args.seqlen, args.eval_windows)
        with torch.no_grad():
            dense_ppl = evaluate.perplexity(base, windows)
        _log({"kind": "dense", "ppl": dense_ppl}, rows)
        inputs = mlp_inputs(base, calib, list(find_gated_mlps(base)), args.max_tokens)
        moe_rows(base, calib, windows, inputs, args, dense_ppl, rows)
        if args.wanda:
            fractions = {(s + k) / args.experts for s, k in _pairs(args.configs)}
            wanda_rows(base, calib[: args.wanda_nsamples], windows, fractions, dense_ppl, rows)
    print(f"loadavg at the end {os.getloadavg()}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
