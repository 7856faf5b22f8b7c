"""Terminal tables and PNG plots for the ``activations`` command (matplotlib, Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from sparsecraft.activation.curve import CurvePoint
from sparsecraft.activation.stats import LayerSummary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def measure_table(rows: list[LayerSummary]) -> str:
    eps = rows[0].near_zero_eps if rows else 0.01
    lines = [f"{'layer':<40} {'in':>5} {'rms':>8} {'|x|<' + format(eps, 'g') + 'rms':>10} {'q50':>8} {'q90':>8} "
             f"{'lazy ch':>7} {'top10%':>6}"]
    for r in rows:
        top = f"{r.top10_mass:6.2f}" if r.top10_mass is not None else f"{'':>6}"
        lines.append(f"{r.fqn:<40} {r.features:>5} {r.rms:8.4f} {r.near_zero:10.3f} {r.quantiles[0.5]:8.4f} "
                     f"{r.quantiles[0.9]:8.4f} {r.lazy_channels:7.3f} {top}")
    return "\n".join(lines)


def measure_plot(rows: list[LayerSummary], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    kinds: dict[str, list[tuple[int, LayerSummary]]] = defaultdict(list)
    for i, r in enumerate(rows):
        kinds[r.fqn.rsplit(".", 1)[-1]].append((i, r))
    for kind, items in kinds.items():
        ax[0].plot([i for i, _ in items], [r.quantiles[0.5] / r.rms for _, r in items], ".-", label=kind)
        ax[1].plot([i for i, _ in items], [r.lazy_channels for _, r in items], ".-", label=kind)
    ax[0].set(xlabel="layer (forward order)", ylabel="median |x| / rms", title="input magnitude")
    ax[1].set(xlabel="layer (forward order)", ylabel="fraction", title="lazy channels (mean |x_j| < 0.1 mean)")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plan_table(planned: dict[str, float], realized: dict[str, float], weight: dict[str, int]) -> str:
    """Per layer kind (q_proj, down_proj, ...): weight-weighted planned and realized activation sparsity."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for fqn, s in planned.items():
        a = acc[fqn.rsplit(".", 1)[-1]]
        a[0] += s * weight[fqn]
        a[1] += realized.get(fqn, float("nan")) * weight[fqn]
        a[2] += weight[fqn]
    lines = [f"{'layer kind':<12} {'planned':>8} {'realized':>8}"]
    lines += [f"{k:<12} {a[0] / a[2]:8.3f} {a[1] / a[2]:8.3f}" for k, a in acc.items()]
    return "\n".join(lines)


def plan_plot(planned: dict[str, float], realized: dict[str, float], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4))
    names = list(planned)
    ax.plot(range(len(names)), [planned[n] for n in names], ".-", label="planned (calibration data)")
    ax.plot(range(len(names)), [realized.get(n, float("nan")) for n in names], ".", label="realized (eval, attached)")
    ax.set(xlabel="Linear layer (forward order)", ylabel="activation sparsity", title="per-layer activation sparsity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve_table(dense: float, points: list[CurvePoint]) -> str:
    lines = [f"{'sparsity':>8} {'realized':>8} {'perplexity':>10} {'vs dense':>8}", f"{0.0:8.3f} {0.0:8.3f} "
             f"{dense:10.3f} {'':>8}"]
    lines += [f"{p.sparsity:8.3f} {p.realized:8.3f} {p.perplexity:10.3f} {p.perplexity / dense - 1:+7.1%}"
              for p in points]
    return "\n".join(lines)


def curve_plot(dense: float, points: list[CurvePoint], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([0.0] + [p.sparsity for p in points], [dense] + [p.perplexity for p in points], "o-")
    ax.set(xlabel="activation sparsity (weight-weighted)", ylabel="perplexity", title="perplexity vs sparsity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
