"""Quality against sparsity: sweeps over methods x patterns x sparsities, the "essential sparsity" knee, and
per-block sensitivity (perplexity when only that block is pruned)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sparsecraft import evaluate
from sparsecraft.api import allocate, prune
from sparsecraft.engine.blocks import layers_by_block, weight_2d
from sparsecraft.engine.passes import input_sqnorms
from sparsecraft.search import apply_ranked_plan_, score_ranks
from sparsecraft.patterns import NM, parse_pattern

Log = Callable[[str], None]


def knee(xs: Sequence[float], ys: Sequence[float], log_y: bool = True) -> float | None:
    """The "essential sparsity": the x where a rising quality-loss curve (e.g. perplexity) bends upward most.

    Kneedle (Satopaa et al. 2011): normalise x and (log) y to [0, 1]; the knee is the point farthest BELOW the
    chord from the first to the last point. None when no point lies below the chord (no upward bend), or with
    fewer than 3 points. ``xs`` must be increasing.
    """
    if len(xs) != len(ys):
        raise ValueError(f"knee needs as many x as y values, got {len(xs)} and {len(ys)}")
    if len(xs) < 3:
        return None
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError("knee needs strictly increasing x values (sort the sweep by sparsity)")
    y = [math.log(v) if log_y else v for v in ys]
    x0, x1, y0, y1 = xs[0], xs[-1], min(y), max(y)
    if y1 == y0:
        return None
    xn = [(x - x0) / (x1 - x0) for x in xs]
    yn = [(v - y0) / (y1 - y0) for v in y]
    chord = [yn[0] + (yn[-1] - yn[0]) * t for t in xn]
    gap = [c - v for c, v in zip(chord, yn)]
    best = max(range(len(xs)), key=lambda i: gap[i])
    return float(xs[best]) if gap[best] > 1e-12 else None


def restore_(model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(dense)


def sweep(model: nn.Module, calib: torch.Tensor, windows: torch.Tensor, methods: Sequence[str],
          patterns: Sequence[str], sparsities: Sequence[float], allocation: str = "uniform",
          allocation_options: dict[str, Any] | None = None, batch_size: int = 8, seed: int = 0,
          log: Log = print) -> list[dict[str, Any]]:
    """One prune + perplexity per (method, pattern, sparsity); N:M patterns give one point each. The model is
    restored to its dense weights after every point and at the end."""
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    try:
        for method in methods:
            for spec in patterns:
                pattern = parse_pattern(spec)
                levels = [pattern.sparsity] if isinstance(pattern, NM) else list(sparsities)
                for s in levels:
                    restore_(model, dense)
                    alloc = allocation if not isinstance(pattern, NM) else "uniform"
                    plan = None if alloc == "uniform" else allocate(
                        model, alloc, s, pattern, calib, options=allocation_options, seed=seed, batch_size=batch_size)
                    result = prune(model, method, s, pattern, calib, layer_sparsity=plan, batch_size=batch_size, seed=seed,
                                   progress=False)
                    ppl = evaluate.perplexity(model, windows)
                    rows.append({"method": method, "pattern": str(pattern), "sparsity": s, "allocation": alloc,
                                 "realized": result.sparsity, "ppl": ppl, "prune_seconds": result.seconds})
                    log(f"{method:>16} {str(pattern):>12} {s:.2f} ({alloc}): perplexity {ppl:.2f}")
    finally:
        restore_(model, dense)
    return rows


def knees(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """"method pattern" -> knee sparsity of each curve with >= 3 points."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        curves.setdefault(f"{r['method']} {r['pattern']}", []).append((r["sparsity"], r["ppl"]))
    out = {}
    for name, pts in curves.items():
        pts.sort()
        out[name] = knee([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 3 else None
    return out


@torch.no_grad()
def block_sensitivity(model: nn.Module, calib: torch.Tensor, windows: torch.Tensor, sparsity: float,
                      method: str = "wanda", batch_size: int = 8, log: Log = print) -> list[dict[str, Any]]:
    """Perplexity with ONLY block b pruned, for every block. wanda/magnitude masks come from one dense statistics
    pass (fast: one perplexity per block); other methods run the engine restricted to the block."""
    by_block = layers_by_block(model)
    layers = {f: m for t in by_block.values() for f, m in t.items()}
    dense_w = {f: weight_2d(m).detach().clone() for f, m in layers.items()}
    fast = method in ("wanda", "magnitude")
    if fast:
        sq = input_sqnorms(model, calib, batch_size=batch_size) if method == "wanda" else \
            {f: torch.ones(w.shape[1]) for f, w in dense_w.items()}
        ranks = score_ranks(dense_w, sq)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    try:
        for block, targets in by_block.items():
            if fast:
                apply_ranked_plan_(layers, dense_w, ranks, {f: sparsity for f in targets})
            else:
                restore_(model, dense)
                prune(model, method, sparsity, "unstructured", calib, include=[f"{block}.*"], progress=False,
                      batch_size=batch_size)
            ppl = evaluate.perplexity(model, windows)
            rows.append({"block": block, "sparsity": sparsity, "method": method, "ppl": ppl})
            log(f"sensitivity {block}: perplexity {ppl:.2f}")
    finally:
        restore_(model, dense)
    return rows


def markdown(rows: list[dict[str, Any]], knee_of: dict[str, float | None], dense_ppl: float,
             sensitivity: list[dict[str, Any]]) -> str:
    levels = sorted({r["sparsity"] for r in rows})
    curves = list(dict.fromkeys(f"{r['method']} {r['pattern']}" for r in rows))
    ppl = {(f"{r['method']} {r['pattern']}", r["sparsity"]): r["ppl"] for r in rows}
    out = [f"# Sparsity sweep\n\nDense perplexity: {dense_ppl:.2f}\n",
           "| method / pattern | " + " | ".join(f"{s:.0%}" for s in levels) + " | knee |",
           "|---" * (len(levels) + 2) + "|"]
    for c in curves:
        cells = [f"{ppl[(c, s)]:.2f}" if (c, s) in ppl else "" for s in levels]
        k = knee_of.get(c)
        out.append(f"| {c} | " + " | ".join(cells) + f" | {'-' if k is None else f'{k:.0%}'} |")
    if sensitivity:
        out += ["\n## Per-block sensitivity (only that block pruned)\n", "| block | perplexity |", "|---|---|"]
        out += [f"| {r['block']} | {r['ppl']:.2f} |" for r in sensitivity]
    return "\n".join(out) + "\n"


def plots(rows: list[dict[str, Any]], knee_of: dict[str, float | None], dense_ppl: float,
          sensitivity: list[dict[str, Any]], folder: Any) -> list[str]:
    """quality.png (perplexity vs sparsity, log scale, knees marked) and sensitivity.png; -> file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in dict.fromkeys(f"{r['method']} {r['pattern']}" for r in rows):
        pts = sorted((r["sparsity"], r["ppl"]) for r in rows if f"{r['method']} {r['pattern']}" == c)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=c)
        k = knee_of.get(c)
        if k is not None:
            ax.axvline(k, ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.axhline(dense_ppl, color="k", lw=0.8, label="dense")
    ax.set(xlabel="sparsity", ylabel="perplexity (log)", yscale="log", title="quality vs sparsity (dotted: knee)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "quality.png", dpi=110)
    plt.close(fig)
    names = ["quality.png"]
    if sensitivity:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(range(len(sensitivity)), [r["ppl"] for r in sensitivity])
        ax.axhline(dense_ppl, color="k", lw=0.8)
        ax.set(xlabel="block", ylabel="perplexity", title=f"only one block pruned at {sensitivity[0]['sparsity']:.0%}")
        fig.tight_layout()
        fig.savefig(folder / "sensitivity.png", dpi=110)
        plt.close(fig)
        names.append("sensitivity.png")
    return names
