"""Overhead of sparsecraft.training in a training step, measured in one run (not part of the test suite).

    OMP_NUM_THREADS=1 python bench/bench_training.py --steps 200

Prints, for an MLP, the mean step time of: plain dense training; the same with a MaskState bound (grad hooks +
post-step re-masking); and the extra time of one RigL / SET drop-and-grow update. Ratios are to the dense step.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from sparsecraft.training import DropAndGrow, DropAndGrowConfig, MaskState
from sparsecraft.training.gmp import magnitude_keep


def step_time(model: nn.Module, opt: torch.optim.Optimizer, steps: int, batch: int, width: int) -> float:
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    for i in range(steps + 5):
        if i == 5:
            t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU(), nn.Linear(args.width, args.width), nn.ReLU(),
                          nn.Linear(args.width, 10))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)

    model, opt = make()
    dense = step_time(model, opt, args.steps, args.batch, args.width)
    model, opt = make()
    keep = {f: magnitude_keep(model.get_submodule(f).weight, torch.ones_like(model.get_submodule(f).weight,
                                                                              dtype=torch.bool), 0.9, "tensor")
            for f in ("0", "2", "4")}
    state = MaskState(model, keep=keep).bind(opt)
    masked = step_time(model, opt, args.steps, args.batch, args.width)
    rows = [("dense step", dense), ("masked step (MaskState bound)", masked)]
    for grow in ("random", "gradient"):
        dst = DropAndGrow(state, opt, DropAndGrowConfig(grow=grow, frequency=1, end_step=10**6))  # type: ignore
        state.record_grads = True
        x, y = torch.randn(args.batch, args.width), torch.randint(0, 10, (args.batch,))
        nn.functional.cross_entropy(model(x), y).backward()
        t0 = time.perf_counter()
        for s in range(1, 6):
            dst.step(s)
            state.record_grads = True  # keep the recorded gradient for the next timed update
        rows.append((f"one {'SET' if grow == 'random' else 'RigL'} update", (time.perf_counter() - t0) / 5))
    print(f"MLP {args.width}x{args.width} x2 + head, batch {args.batch}, {args.threads} thread(s), 90% sparse")
    print("| what | ms | x dense step |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {1000 * t:.2f} | {t / dense:.2f} |")


if __name__ == "__main__":
    main()
