"""report.md and plots of a shrink run (perplexity vs parameters kept, kept widths per block)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plots(report: dict[str, Any], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs, ys = [1.0, report["kept_fraction"]], [report["dense_ppl"], report["ppl"]]
    ax.plot(xs, ys, "o-", label="shrunk")
    if "distill" in report:
        ax.plot([report["kept_fraction"]], [report["distill"]["ppl"]], "s", label="+ distillation")
    ax.set_xlabel("fraction of parameters kept")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "ppl_vs_params.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    dense, sizes = report["dense_sizes"], report["sizes"]
    names = [k for k in dense if dense[k]]
    ax.bar(names, [sizes[k] / dense[k] for k in names])
    ax.set_ylabel("kept fraction (uniform over blocks)")
    fig.tight_layout()
    fig.savefig(folder / "kept_widths.png", dpi=100)
    plt.close(fig)
    return ["plots/ppl_vs_params.png", "plots/kept_widths.png"]


def markdown(report: dict[str, Any], images: list[str]) -> str:
    lines = ["# sparsecraft shrink", "", f"command: `{report['command']}`", "",
             "| | dense | shrunk |", "|---|---|---|",
             f"| parameters | {report['dense_params']:,} | {report['params']:,} ({report['kept_fraction']:.1%}) |",
             f"| perplexity | {report['dense_ppl']:.3f} | {report['ppl']:.3f} |"]
    for k, v in report["dense_sizes"].items():
        lines.append(f"| {k} | {v} | {report['sizes'][k]} |")
    if "distill" in report:
        d = report["distill"]
        lines += ["", f"after distillation ({d['tokens']:,} tokens, {d['steps']} steps): perplexity {d['ppl']:.3f}"]
    if report.get("dropped_blocks"):
        lines += ["", f"removed blocks: {report['dropped_blocks']}"]
    lines += ["", *[f"- {n}" for n in report.get("notes", [])], "", *[f"![]({i})" for i in images], ""]
    return "\n".join(lines)
