"""Timing helpers for benchmarks: interleaved medians (noise hits both sides alike) and read bandwidth."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 15, calls: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternating rounds of ``calls`` calls each."""
    for fn in fns.values():  # warm up: build, caches, thread pool
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def read_bandwidth(megabytes: int = 256, rounds: int = 7) -> float:
    """Bytes per second of a streaming read (a sum over a large fp32 tensor), median of ``rounds``."""
    x = torch.ones(megabytes * 2**20 // 4)
    seconds = time_interleaved({"sum": lambda: x.sum()}, rounds=rounds, calls=1)["sum"]
    return x.numel() * 4 / seconds


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
