"""Fashion-MNIST: dense vs GMP vs RigL vs SET vs static random ERK at 80% and 90% sparsity, same budget.

    apt-get install -y dataset-fashion-mnist        # -> /usr/share/datasets/fashion-mnist/*-ubyte.gz
    OMP_NUM_THREADS=1 python recipes/train_fashion_mnist.py --out runs/fmnist

Every sparse run uses the same ERK layer allocation, so the runs differ only in HOW the mask is found:
static (random, fixed), SET (random regrowth), RigL (gradient regrowth), GMP (dense start, cubic schedule
pruning by magnitude). Writes results.md / results.json (accuracy table) and curves.png (test accuracy per epoch).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsecraft.patterns import num_pruned
from sparsecraft.training import (
    DropAndGrow,
    DropAndGrowConfig,
    GMPConfig,
    GradualMagnitudePruner,
    MaskState,
    SparsitySchedule,
    erk,
    maskable_modules,
)

DATA = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """IDX file (optionally gzipped) -> array; header: 2 zero bytes, dtype code, ndim, then big-endian dims."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(read_idx(DATA / f"{split}-images-idx3-ubyte.gz").copy()).float().div_(255.0)  # (N, 28, 28)
    y = torch.from_numpy(read_idx(DATA / f"{split}-labels-idx1-ubyte.gz").copy()).long()
    return ((x - 0.2860) / 0.3530).reshape(len(x), -1), y  # (N, 784), mean/std of the training set


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 3), nn.ReLU(),
                         nn.Linear(hidden // 3, 10))


def random_erk_masks(model: nn.Module, sparsity: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random masks with exactly the ERK per-layer zero counts (pure random choice, no scores to rank)."""
    shapes = {f: tuple(model.get_submodule(f).weight.shape) for f in maskable_modules(model)}
    masks = {}
    for fqn, s in erk(shapes, sparsity).items():
        n = int(np.prod(shapes[fqn]))
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=g)[: num_pruned(n, s)]] = False
        masks[fqn] = keep.reshape(shapes[fqn])
    return masks


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 2000]).argmax(1) == y[i : i + 2000]).sum()) for i in range(0, len(x), 2000))
    model.train()
    return correct / len(x)


def run(method: str, sparsity: float, seed: int, data: dict, args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = make_model(args.hidden)
    xtr, ytr, xte, yte = data["xtr"], data["ytr"], data["xte"], data["yte"]
    steps_per_epoch = len(xtr) // args.batch
    total = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.1)
    state = pruner = dst = None
    if method in ("static", "set", "rigl"):
        state = MaskState(model, keep=random_erk_masks(model, sparsity, g)).bind(opt)
    if method in ("set", "rigl"):  # RigL paper: delta T = 100, alpha = 0.3, T_end = 75% of training
        cfg = DropAndGrowConfig(grow="random" if method == "set" else "gradient", drop_fraction=0.3,
                                frequency=100, end_step=int(0.75 * total), seed=seed)
        dst = DropAndGrow(state, opt, cfg)
    if method == "gmp":  # Zhu & Gupta: prune from 10% to 60% of training, every 100 steps, then fine-tune
        state = MaskState(model).bind(opt)
        schedule = SparsitySchedule(sparsity, "cubic", start_step=int(0.1 * total), end_step=int(0.6 * total),
                                    frequency=100)
        pruner = GradualMagnitudePruner(state, GMPConfig(schedule, allocation="erk"), optimizer=opt)
    curve, step, t0 = [], 0, time.time()
    for _epoch in range(args.epochs):
        order = torch.randperm(len(xtr), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch : (i + 1) * args.batch]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if pruner is not None:
                pruner.step(step)
            if dst is not None:
                dst.step(step)
            step += 1
        curve.append(accuracy(model, xte, yte))
    realized = state.sparsity() if state is not None else 0.0
    if state is not None:  # the masks are exact: check it against the weights themselves
        assert all(torch.count_nonzero(state.weight(f)[~state.keep(f)]) == 0 for f in state.fqns)
    return {"method": method, "sparsity": sparsity, "seed": seed, "realized_sparsity": realized, "test_acc": curve[-1],
            "best_acc": max(curve), "curve": curve, "seconds": time.time() - t0,
            "updates": len(dst.history) if dst else None}


def summarize(results: list[dict]) -> list[dict]:
    """Mean (and std over seeds) per (method, sparsity), in run order."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["sparsity"]), []).append(r)
    rows = []
    for (method, s), rs in groups.items():
        acc = np.array([r["test_acc"] for r in rs])
        rows.append({"method": method, "sparsity": s, "realized_sparsity": rs[0]["realized_sparsity"],
                     "acc": acc.mean(), "std": acc.std(), "best": np.mean([r["best_acc"] for r in rs]),
                     "curve": np.mean([r["curve"] for r in rs], axis=0).tolist(), "seeds": len(rs),
                     "seconds": np.mean([r["seconds"] for r in rs])})
    return rows


def write_outputs(results: list[dict], args: argparse.Namespace, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    jargs = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps({"args": jargs, "results": results}, indent=1))
    rows = summarize(results)
    dense = rows[0]["acc"]
    arch = f"MLP 784-{args.hidden}-{args.hidden // 3}-10"
    lines = [f"seeds: {args.seeds}, epochs: {args.epochs}, {arch}, ERK allocation",
             "", "| method | target sparsity | realized sparsity | final test acc (%) | std over seeds "
             "| best epoch acc (%) | vs dense (pt) | s per run |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['sparsity']:.2f} | {r['realized_sparsity']:.4f} | {100 * r['acc']:.2f} "
                     f"| {100 * r['std']:.2f} | {100 * r['best']:.2f} | {100 * (r['acc'] - dense):+.2f} "
                     f"| {r['seconds']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, axes = plt.subplots(1, len(args.sparsities), figsize=(5.5 * len(args.sparsities), 4), sharey=True,
                             squeeze=False)
    for ax, s in zip(axes[0], args.sparsities):
        for r in rows:
            if r["method"] == "dense" or r["sparsity"] == s:
                ax.plot(range(1, len(r["curve"]) + 1), [100 * a for a in r["curve"]], marker="o", label=r["method"])
        ax.set_title(f"Fashion-MNIST MLP, {int(round(100 * s))}% sparse (ERK)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel(f"test accuracy (%), mean of {len(args.seeds)} seed(s)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/train_fashion_mnist"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    p.add_argument("--methods", nargs="+", default=["static", "set", "rigl", "gmp"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not (DATA / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"Fashion-MNIST not found under {DATA}: run `apt-get install -y dataset-fashion-mnist`")
    (xtr, ytr), (xte, yte) = load("train"), load("t10k")
    data = {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}
    results = []
    for seed in args.seeds:
        for m, s in [("dense", 0.0)] + [(m, s) for s in args.sparsities for m in args.methods]:
            results.append(run(m, s, seed, data, args))
            r = results[-1]
            print(f"seed {seed} {m} @ {s}: {100 * r['test_acc']:.2f}% (realized {r['realized_sparsity']:.4f}) in "
                  f"{r['seconds']:.0f}s", flush=True)
    write_outputs(results, args, args.out)


if __name__ == "__main__":
    main()
