"""``sparsecraft kv eval``: a KV-cache press against the full cache on one model and one long text.

    sparsecraft kv eval MODEL --method snapkv --budget 0.25 --text book.txt --seqlen 2048

Reports, for the full cache and the press in the same run: long-text perplexity (``--chunk`` tokens scored after
``--seqlen`` tokens of context, at ``--eval-windows`` offsets), needle retrieval accuracy (``--needles`` prompts of
``--seqlen`` tokens), cache bytes after the prompt and the decode steps, prefill seconds and decode tokens/s.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from sparsecraft import data
from sparsecraft.attention import PRESSES, KVConfig
from sparsecraft.attention.evaluate import evaluate_press, needle_room
from sparsecraft.commands.options import add_config_arguments, config_from_args
from sparsecraft.config import check_common, opt, shared
from sparsecraft.models import context_length, load_model


@dataclass(frozen=True)
class KVEvalConfig:
    """Settings of ``sparsecraft kv eval`` (the press fields are those of sparsecraft.attention.KVConfig)."""

    action: str = opt("eval", "eval (the only action for now)", choices=lambda: ["eval"])
    model: str = shared("model")
    method: str = opt("snapkv", "KV press", choices=lambda: sorted(PRESSES))
    budget: float = opt(0.25, "cache kept per layer and head: a fraction of the prompt in (0, 1] or a token count")
    sinks: int = opt(4, "first tokens always kept (attention sinks)")
    window: int = opt(32, "last prompt tokens always kept (SnapKV's observation window)")
    pool: int = opt(7, "snapkv/merge: odd pooling kernel along the keys")
    heads: str = opt("uniform", "uniform | adaptive (a layer's heads share its budget)",
                     choices=lambda: ["uniform", "adaptive"])
    layers: str = opt("uniform", "uniform | pyramid (more cache in early layers)",
                      choices=lambda: ["uniform", "pyramid"])
    eval: str = shared("eval")
    seqlen: int = opt(2048, "prompt tokens: the context before each scored chunk, and each needle prompt")
    chunk: int = opt(0, "tokens scored after the context (0 = seqlen // 8)")
    eval_windows: int = opt(2, "perplexity samples at evenly spaced offsets of the text (0 = skip)")
    needles: int = opt(4, "needle-in-a-haystack prompts (0 = skip)")
    decode_steps: int = opt(16, "greedy decode steps timed after one prompt (0 = skip)")
    device: str = shared("device")
    dtype: str = opt("float32", "float32 | bfloat16 | float16 | auto")

    def __post_init__(self) -> None:
        check_common(self)
        self.press()  # the press settings fail here, before anything loads
        for name in ("chunk", "needles", "decode_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.chunk >= self.seqlen:
            raise ValueError(f"chunk ({self.chunk}) must be shorter than seqlen ({self.seqlen}); lower --chunk")

    def press(self) -> KVConfig:
        names = {f.name for f in fields(KVConfig)}
        return KVConfig(**{k: getattr(self, k) for k in names})

    @property
    def scored(self) -> int:
        return self.chunk or max(1, self.seqlen // 8)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kv", help="KV-cache compression: quality, memory and speed of a press vs the full cache",
                       description="Compress the KV cache of every prompt with a press (streaming, h2o, snapkv, "
                                   "merge) and compare it with the full cache in one run.")
    add_config_arguments(p, KVEvalConfig, positional=("action", "model"))
    p.add_argument("--text", dest="eval", default=argparse.SUPPRESS, help="the same as --eval")
    p.set_defaults(func=run)


def _fmt(row: dict[str, Any], key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'cache':<18} {'perplexity':>10} {'needle':>7} {'cache MiB':>10} {'prefill s':>9} {'decode tok/s':>12}"]
    for r in rows:
        name = "full" if r["method"] == "full" else f"{r['method']} {r['budget']:g}"
        mib = f"{r['cache_bytes'] / 2 ** 20:.3f}" if "cache_bytes" in r else "-"
        lines.append(f"{name:<18} {_fmt(r, 'perplexity', '.3f'):>10} {_fmt(r, 'needle', '.2f'):>7} {mib:>10} "
                     f"{_fmt(r, 'prefill_s', '.3f'):>9} {_fmt(r, 'decode_tok_s', '.1f'):>12}")
    return "\n".join(lines)


def ratios(full: dict[str, Any], press: dict[str, Any]) -> str:
    parts = []
    if "perplexity" in full:
        parts.append(f"perplexity x{press['perplexity'] / full['perplexity']:.4f}")
    if "needle" in full:
        parts.append(f"needle {press['needle']:.2f} vs {full['needle']:.2f}")
    if "cache_bytes" in full:
        parts.append(f"cache x{press['cache_bytes'] / full['cache_bytes']:.3f}")
        parts.append(f"decode speed x{press['decode_tok_s'] / full['decode_tok_s']:.2f}")
    return "press / full: " + ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(KVEvalConfig, args)
    text = data.read_text(cfg.eval, "eval")  # a bad path fails before the model loads
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    longest = cfg.seqlen + max(cfg.scored, cfg.decode_steps, 6 if cfg.needles else 0)
    if (ctx := context_length(model)) is not None and longest > ctx:
        raise ValueError(f"--seqlen {cfg.seqlen} plus {longest - cfg.seqlen} scored or decoded tokens is longer "
                         f"than the model's context ({ctx} tokens); lower --seqlen")
    tokens = data.tokenize(tok, text)
    needles = cfg.needles
    if needles and cfg.seqlen < needle_room(tok):
        print(f"needle retrieval skipped: a {cfg.seqlen}-token prompt cannot hold the needle, the question and "
              f"a haystack ({needle_room(tok)} tokens); raise --seqlen")
        needles = 0
    sizes = dict(context=cfg.seqlen, chunk=cfg.scored, samples=cfg.eval_windows, needles=needles,
                 decode_steps=cfg.decode_steps)
    rows = [evaluate_press(model, tok, tokens, None, **sizes), evaluate_press(model, tok, tokens, cfg.press(), **sizes)]
    print(f"{cfg.method} budget {cfg.budget:g} (sinks {cfg.sinks}, window {cfg.window}, heads {cfg.heads}, layers "
          f"{cfg.layers}) on {cfg.seqlen}-token prompts of {cfg.eval}")
    print(table(rows))
    print(ratios(*rows))
    return 0
