"""``sparsecraft eval``: perplexity of any model (dense or packed folder, hub id, .gguf) on any text."""

from __future__ import annotations

import argparse

from sparsecraft import data, evaluate
from sparsecraft.commands.options import add_config_arguments, config_from_args
from sparsecraft.config import EvalConfig
from sparsecraft.models import check_seqlen, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a text",
                       description="Perplexity of a model on consecutive windows of a text.")
    add_config_arguments(p, EvalConfig, positional=("model",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvalConfig, args)
    text = data.read_text(cfg.eval, "eval")
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    check_seqlen(model, cfg.seqlen)
    windows = data.eval_windows(data.tokenize(tok, text), cfg.seqlen, cfg.eval_windows)
    ppl = evaluate.perplexity(model, windows, batch_size=cfg.batch_size, progress=args.progress)
    print(f"perplexity {ppl:.3f} on {windows.shape[0]} windows of {cfg.seqlen} tokens of {cfg.eval}")
    return 0
