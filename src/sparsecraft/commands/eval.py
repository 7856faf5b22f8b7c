"""``sparsecraft eval``: perplexity of any model (dense or packed folder, hub id, .gguf) on any text, and
lm-evaluation-harness tasks (``--tasks``) on the model as sparsecraft runs it."""

from __future__ import annotations

import argparse
import logging

from sparsecraft import data, evaluate, lmeval
from sparsecraft.commands.options import add_config_arguments, config_from_args
from sparsecraft.commands.prune_streamed import eval_streamed, folder_reason
from sparsecraft.config import EvalConfig
from sparsecraft.models import check_seqlen, hub_snapshot, load_model

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a text, and lm-eval tasks",
                       description="Perplexity of a model on consecutive windows of a text (--eval-windows 0 skips "
                                   "it), and lm-evaluation-harness tasks with --tasks.")
    add_config_arguments(p, EvalConfig, positional=("model",))
    p.add_argument("--no-stream", action="store_true", dest="no_stream",
                   help="load the whole model even when it is a local safetensors folder (whose perplexity is "
                        "otherwise computed one block in memory at a time)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvalConfig, args)
    manager = lmeval.check_tasks(cfg.tasks, cfg.task_path) if cfg.tasks else None  # before the model loads
    text = data.source_text(None if cfg.eval_dataset else cfg.eval, cfg.eval_dataset, "eval") \
        if cfg.eval_windows else None
    streams = text is not None and not cfg.tasks and not args.no_stream
    spec = str((hub_snapshot(cfg.model) if streams else None) or cfg.model)  # a hub id: its downloaded snapshot
    if streams and folder_reason(spec) is None:  # a local safetensors folder: one block in memory at a time
        ppl, n = eval_streamed(spec, text, cfg.seqlen, cfg.eval_windows, cfg.batch_size, cfg.device, cfg.dtype,
                               args.progress)
        print(f"perplexity {ppl:.3f} on {n} windows of {cfg.seqlen} tokens of {cfg.eval_dataset or cfg.eval}")
        return 0
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    if text is not None:
        check_seqlen(model, cfg.seqlen)
        windows = data.eval_windows(data.tokenize(tok, text), cfg.seqlen, cfg.eval_windows)
        ppl = evaluate.perplexity(model, windows, batch_size=cfg.batch_size, progress=args.progress)
        print(f"perplexity {ppl:.3f} on {windows.shape[0]} windows of {cfg.seqlen} tokens of "
              f"{cfg.eval_dataset or cfg.eval}")
    if cfg.tasks:
        scores = lmeval.run_tasks(model, tok, cfg.tasks, cfg.task_path, limit=cfg.task_limit,
                                  batch_size=cfg.batch_size, seed=cfg.seed, manager=manager)
        for task, metric, value in lmeval.table(scores):
            print(f"{task}  {metric}  {value}")
    return 0
