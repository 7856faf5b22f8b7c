"""``sparsecraft eval``: perplexity of any model on any text."""

from __future__ import annotations

import argparse

from sparsecraft import data, evaluate
from sparsecraft.models import context_length, load_model, parse_dtype


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a text")
    p.add_argument("model", nargs="?", default=None, help="HF id, local directory or .gguf (default: SmolLM2-135M)")
    p.add_argument("--text", default="shakespeare", help="text file, folder, or 'shakespeare' (held-out works)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16, help="number of windows of seqlen tokens")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.windows < 1:
        raise ValueError(f"--windows must be >= 1, got {args.windows}")
    model, tok = load_model(args.model, parse_dtype(args.dtype), args.device)
    ctx = context_length(model)
    if ctx is not None and args.seqlen > ctx:
        raise ValueError(f"seqlen {args.seqlen} is longer than the model's context ({ctx} tokens); lower --seqlen")
    windows = data.eval_windows(data.tokenize(tok, data.read_text(args.text, "eval")), args.seqlen, args.windows)
    ppl = evaluate.perplexity(model, windows, progress=True)
    print(f"perplexity {ppl:.3f} on {windows.shape[0]} windows of {args.seqlen} tokens of {args.text}")
    return 0
