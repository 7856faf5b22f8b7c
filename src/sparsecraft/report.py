"""The run report: report.json (every number), report.md (tables) and PNG plots."""

from __future__ import annotations

import json
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
        ("sparsity of pruned layers", "0", f"{report['sparsity']['overall_pruned_layers']:.4f}"),
        ("nonzero parameters", f"{params['total']:,}", f"{params['nonzero_after']:,}"),
        ("checkpoint bytes (whole model)", _fmt_bytes(size["dense_checkpoint"]), _fmt_bytes(size["packed_checkpoint"])),
        ("bytes of pruned layers", _fmt_bytes(size["pruned_layers_dense"]), _fmt_bytes(size["pruned_layers_packed"])),
        ("prune time", "", f"{report['time_s']['prune']:.1f} s"),
        ("peak memory of the process (RSS)", "", _fmt_bytes(report["peak_memory_bytes"])),
        ("peak memory while pruning (RSS)", "", _fmt_bytes(report["prune_memory_bytes"]["peak_rss"])),
    ]


def terminal_table(report: dict[str, Any]) -> str:
    rows = [("", "dense", "sparse")] + summary_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def plots(report: dict[str, Any], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    layers = list(report["layers"].values())
    names = [r["fqn"] for r in layers]
    made = []
    for key, label, fname in [("sparsity", "realized sparsity", "layer_sparsity.png"),
                              ("error", "relative reconstruction error", "layer_error.png")]:
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.06), 3.2))
        ax.bar(range(len(names)), [r[key] for r in layers], width=1.0)
        ax.set_xlabel("layer (in model order)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per layer")
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        made.append(fname)
    ppl = report["perplexity"]
    if ppl["dense"] is not None:
        fig, ax = plt.subplots(figsize=(4, 3.2))
        ax.bar(["dense", "sparse"], [ppl["dense"], ppl["sparse"]], color=["#777", "#c33"])
        ax.set_ylabel("perplexity (lower is better)")
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
             f"from `{s['calib']}`, evaluated on {s['eval_windows']} windows of `{s['eval']}`, seed {s['seed']}.", "",
             "| | dense | sparse |", "|---|---|---|"]
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
