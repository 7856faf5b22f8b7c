"""The run report: report.json (every number), report.md (tables) and PNG plots."""

from __future__ import annotations

import json
import math
import platform
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from sparsecraft.engine.record import PruneResult
from sparsecraft.io import atomic_write_bytes


def versions() -> dict[str, str]:
    import transformers

    from sparsecraft import __version__

    return {"sparsecraft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def by_layer_type(result: PruneResult) -> dict[str, float]:
    """Realized sparsity per layer type (the last fqn component, e.g. q_proj), parameter-weighted."""
    zeros: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for fqn, keep in result.masks.items():
        kind = fqn.rsplit(".", 1)[-1]
        zeros[kind] += int((~keep).sum())
        total[kind] += keep.numel()
    return {k: zeros[k] / total[k] for k in total}


def build(result: PruneResult, settings: dict[str, Any], numbers: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": " ".join(["sparsecraft"] + sys.argv[1:]),
        "versions": versions(),
        "settings": settings,
        "seed": settings.get("seed"),
        **numbers,
        "sparsity": {"overall_pruned_layers": result.sparsity, "by_layer_type": by_layer_type(result)},
        "layers": {k: v.to_dict() for k, v in result.layers.items()},
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(report, indent=2, default=float) + "\n").encode())


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(quantity, dense, sparse) rows shared by the terminal table and report.md."""
    ppl, size, params = report["perplexity"], report["bytes"], report["parameters"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return [
        ("perplexity", fmt(ppl["dense"]), fmt(ppl["sparse"])),
        *task_rows(report.get("tasks")),
        ("sparsity of pruned layers", "0", f"{report['sparsity']['overall_pruned_layers']:.4f}"),
        ("nonzero parameters", f"{params['total']:,}", f"{params['nonzero_after']:,}"),
        ("checkpoint bytes (whole model)", _fmt_bytes(size["dense_checkpoint"]), _fmt_bytes(size["packed_checkpoint"])),
        ("bytes of pruned layers", _fmt_bytes(size["pruned_layers_dense"]), _fmt_bytes(size["pruned_layers_packed"])),
        *([("input model file", _fmt_bytes(size["input_model"]), "")] if size.get("input_model") else []),
        *speed_rows(report.get("speed")),
        ("prune time", "", f"{report['time_s']['prune']:.1f} s"),
        ("peak memory of the process (RSS)", "", _fmt_bytes(report["peak_memory_bytes"])),
        ("peak memory while pruning (RSS)", "", _fmt_bytes(report["prune_memory_bytes"]["peak_rss"])),
    ]


def busy_machine(speed: dict[str, float]) -> str | None:
    """Why a decode-speed measurement cannot be trusted, or None: more runnable threads than CPUs means that a
    multi-threaded op waits for a descheduled thread, which hits dense and packed layers unequally (``make demo`` on
    a 2-core machine with one other busy process reported packed 5.14x faster, dense at 0.9 tok/s)."""
    load, cpus = speed.get("load_average"), speed.get("cpus")
    if load is None or cpus is None or load <= cpus + 0.5:
        return None
    return (f"machine busy during the timing (load average {load:.1f} on {int(cpus)} CPUs, "
            f"{int(speed.get('threads', 0))} torch threads): the ratio is not reliable; rerun on an idle machine")


def speed_rows(speed: dict[str, float] | None) -> list[tuple[str, str, str]]:
    """The decode-speed row: masked dense vs packed tokens/s, with the ratio and the token agreement."""
    if not speed:
        return []
    rows = [("decode tokens/s (this machine)", f"{speed['dense_tok_s']:.1f}",
             f"{speed['packed_tok_s']:.1f} ({speed['speedup']:.2f}x, same tokens {100 * speed['same_tokens']:.0f}%)")]
    busy = busy_machine(speed)
    return rows + ([("decode timing", "", busy)] if busy else [])


def task_rows(tasks: dict[str, dict[str, dict[str, float]]] | None) -> list[tuple[str, str, str]]:
    """(task metric, dense, sparse) rows of the lm-eval scores ({"dense"|"sparse": {task: {metric: value}}})."""
    if not tasks:
        return []
    dense, sparse = tasks["dense"], tasks["sparse"]
    cell = lambda scores, t, m: f"{scores[t][m]:.4f}" if m in scores.get(t, {}) else "-"  # noqa: E731
    return [(f"{t} {m}", cell(dense, t, m), cell(sparse, t, m))
            for t in dense for m in dense[t] if not m.endswith("_stderr")]


def terminal_table(report: dict[str, Any]) -> str:
    rows = [("", "dense", "sparse")] + summary_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def layer_grid(layers: list[dict[str, Any]], key: str) -> tuple[list[int], list[str], list[list[float]]]:
    """Per-layer values -> (block indices, layer types, matrix [block][type], NaN where a block lacks the type).
    The block is the first integer in the fqn; the type is what follows it (e.g. ``self_attn.q_proj``)."""
    cells: dict[tuple[int, str], float] = {}
    for rec in layers:
        parts = rec["fqn"].split(".")
        i = next((j for j, p in enumerate(parts) if p.isdigit()), None)
        block, kind = (int(parts[i]), ".".join(parts[i + 1:])) if i is not None else (0, rec["fqn"])
        cells[(block, kind)] = float(rec[key])
    blocks = sorted({b for b, _ in cells})
    kinds = list(dict.fromkeys(k for _, k in cells))
    return blocks, kinds, [[cells.get((b, k), math.nan) for k in kinds] for b in blocks]


def plots(report: dict[str, Any], folder: Path) -> list[str]:
    """layer_sparsity.png and layer_error.png: blocks x layer-type heatmaps (error on a log colour scale when it
    spans a decade or more); perplexity.png: dense vs sparse bars with their values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    folder.mkdir(parents=True, exist_ok=True)
    layers = list(report["layers"].values())
    made = []
    for key, label, fname in [("sparsity", "realized sparsity", "layer_sparsity.png"),
                              ("error", "relative reconstruction error", "layer_error.png")]:
        blocks, kinds, grid = layer_grid(layers, key)
        values = [v for row in grid for v in row if math.isfinite(v)]
        if not values:
            continue
        positive = [v for v in values if v > 0]
        norm = LogNorm(min(positive), max(positive)) if key == "error" and positive and \
            max(positive) >= 10 * min(positive) else None
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.2 + 0.22 * len(blocks)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        ax.set_xticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds], rotation=45, ha="right")
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_xlabel("layer type")
        ax.set_ylabel("block")
        ax.set_title(f"{label}{' (log scale)' if norm is not None else ''}")
        fig.colorbar(image, ax=ax, label=label)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        made.append(fname)
    ppl = report["perplexity"]
    if ppl["dense"] is not None:
        fig, ax = plt.subplots(figsize=(4, 3.2))
        bars = ax.bar(["dense", "sparse"], [ppl["dense"], ppl["sparse"]], color=["#777", "#c33"])
        ax.bar_label(bars, fmt="%.2f")
        ax.set_ylabel("perplexity (lower is better)")
        ax.margins(y=0.15)
        fig.tight_layout()
        fig.savefig(folder / "perplexity.png", dpi=110)
        plt.close(fig)
        made.append("perplexity.png")
    return made


def markdown(report: dict[str, Any], images: list[str]) -> str:
    s = report["settings"]
    lines = [f"# sparsecraft prune report", "",
             f"`{report['command']}`", "",
             f"Model `{s['model']}`, method **{s['method']}**, pattern **{s['pattern']}**, "
             f"sparsity {report['target_sparsity']:g}, {s['nsamples']} calibration windows of {s['seqlen']} tokens "
             f"from `{s.get('calib_dataset') or s['calib']}`, evaluated on {s['eval_windows']} windows of "
             f"`{s.get('eval_dataset') or s['eval']}`, seed {s['seed']}.", ""]
    if report.get("streaming", {}).get("used"):
        st = report["streaming"]
        lines += [f"Streamed: one block in memory at a time, {st['world_size']} process(es); peak RSS while pruning "
                  f"{_fmt_bytes(st['peak_rss'])} (rank 0).", ""]
    lines += ["| | dense | sparse |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    lines += ["", "## Sparsity by layer type", "", "| layer type | sparsity |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in report["sparsity"]["by_layer_type"].items()]
    lines += ["", "## Plots", ""] + [f"![{i}](plots/{i})" for i in images]
    lines += ["", "## Per layer", "", "| layer | shape | sparsity | rel. error | time (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['fqn']} | {r['shape'][0]}x{r['shape'][1]} | {r['sparsity']:.4f} | {r['error']:.4g} | "
              f"{r['seconds']:.2f} |" for r in report["layers"].values()]
    v = report["versions"]
    lines += ["", f"Versions: sparsecraft {v['sparsecraft']}, torch {v['torch']}, transformers {v['transformers']}, "
              f"Python {v['python']}."]
    return "\n".join(lines) + "\n"
