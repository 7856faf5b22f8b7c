"""``sparsecraft moe``: remove or merge whole experts of an MoE model, or turn a dense model into an MoE.

    sparsecraft moe prune MOE_MODEL --keep 4 --output runs/reap4      # REAP: drop the lowest-scoring experts
    sparsecraft moe merge MOE_MODEL --keep 4 --output runs/merge4     # average clusters of similar experts
    sparsecraft moe moefy MODEL --experts 8 --top-k 2 --shared 1 --output runs/moe8
    sparsecraft moe moefy MODEL --experts 8 --top-k 3 --shared 1 --refit 0.3 --output runs/moe8r   # + down refit

prune / merge write a plain Hugging Face checkpoint with the new expert count (loads without sparsecraft); moefy
writes the dense checkpoint with neurons grouped by expert plus moe.safetensors (load it with
``sparsecraft.moe.load_moefied``). Each writes report.json (perplexity before and after) last, in a staging folder that
replaces the output when complete.
"""

from __future__ import annotations

import argparse
import json
import sys

from sparsecraft import data, evaluate
from sparsecraft.commands.options import add_output_arguments
from sparsecraft.io import StagedOutput, atomic_write_text, check_output
from sparsecraft.models import load_model, parse_dtype
from sparsecraft.moe.experts import ExpertConfig, reduce_experts
from sparsecraft.moe.moefy import ROUTERS, MoEfyConfig, find_gated_mlps, mlp_inputs, moefy_, save_moefied
from sparsecraft.moe.refit import refit_down_

ACTIONS = ("prune", "merge", "moefy")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("moe", help="MoE models: remove (REAP) or merge whole experts; dense -> MoE (moefy)")
    p.add_argument("action", choices=ACTIONS, help="prune: drop experts; merge: average similar experts; "
                                                   "moefy: split dense MLPs into experts")
    p.add_argument("model", nargs="?", default=None, help="HF id, local directory or .gguf (default: SmolLM2-135M)")
    p.add_argument("--keep", type=int, default=0, help="prune/merge: experts left in every MoE layer")
    p.add_argument("--experts", type=int, default=8, help="moefy: experts per MLP, shared ones included")
    p.add_argument("--top-k", type=int, default=2, dest="top_k", help="moefy: routed experts run per token")
    p.add_argument("--shared", type=int, default=0, help="moefy: experts that always run")
    p.add_argument("--router", default="lstsq", choices=ROUTERS, help="moefy: router fit")
    p.add_argument("--refit", type=float, default=0.0, metavar="RIDGE",
                   help="moefy: refit the experts' down projections for the routing in closed form with this ridge "
                        "(e.g. 0.3; 0 = off; see docs/moe.md)")
    p.add_argument("--calib", default="shakespeare", help="calibration text (file, folder or 'shakespeare')")
    p.add_argument("--eval", default="shakespeare", help="evaluation text")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=8, dest="eval_windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    add_output_arguments(p, "runs/moe")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> ExpertConfig | MoEfyConfig:
    if args.action == "moefy":
        return MoEfyConfig(num_experts=args.experts, top_k=args.top_k, shared_experts=args.shared,
                           router=args.router, max_tokens=args.nsamples * args.seqlen, seed=args.seed)
    if args.keep < 1:
        raise ValueError(f"moe {args.action} needs --keep N, the number of experts to keep per MoE layer (>= 1)")
    return ExpertConfig(args.action, keep=args.keep)


def run(args: argparse.Namespace) -> int:
    config = _config(args)  # bad settings fail before anything is read
    if args.refit < 0 or args.refit > 0 and args.action != "moefy":
        raise ValueError(f"--refit {args.refit}: give a ridge > 0 (e.g. 0.3), and only with moefy")
    if min(args.nsamples, args.seqlen, args.eval_windows) < 1:
        raise ValueError("--nsamples, --seqlen and --eval-windows must be >= 1")
    out = check_output(args.output, [args.model, args.calib, args.eval], overwrite=args.overwrite)
    model, tok = load_model(args.model, parse_dtype(args.dtype))
    calib = data.calibration_windows(data.tokenize(tok, data.read_text(args.calib, "calib")), args.nsamples,
                                     args.seqlen, seed=args.seed)
    ev = data.eval_windows(data.tokenize(tok, data.read_text(args.eval, "eval")), args.seqlen, args.eval_windows)
    before = evaluate.perplexity(model, ev)
    params = sum(p.numel() for p in model.parameters())
    if isinstance(config, MoEfyConfig):
        inputs = mlp_inputs(model, calib, list(find_gated_mlps(model)), config.max_tokens)
        result = moefy_(model, calib, config, inputs=inputs)
        refit = refit_down_(model, inputs, ridge=args.refit) if args.refit > 0 else {}
        del inputs
    else:
        result = reduce_experts(model, calib, config)
    report = {"command": " ".join(sys.argv), "settings": {**vars(args), "func": None}, "ppl_before": before,
              "ppl": evaluate.perplexity(model, ev), "params_before": params,
              "params": sum(p.numel() for p in model.parameters()), **result.as_dict()}
    if isinstance(config, MoEfyConfig) and refit:
        report["refit_error_before_after"] = refit
    with StagedOutput(out) as stage:
        if isinstance(config, MoEfyConfig):
            save_moefied(model, stage.path)
        else:
            model.save_pretrained(stage.path)
        tok.save_pretrained(stage.path)
        atomic_write_text(stage.path / "report.json", json.dumps(report, indent=1, default=str))
    print(f"moe {args.action}: perplexity {before:.2f} -> {report['ppl']:.2f}; wrote {out}")
    return 0
