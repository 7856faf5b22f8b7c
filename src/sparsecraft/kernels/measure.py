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


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the largest CPU cache (Linux sysfs), or ``default`` where sysfs does not say."""
    from pathlib import Path

    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=default)


def copies_to_stream(nbytes: int, budget: int = 1 << 30, max_copies: int = 256) -> int:
    """How many distinct copies of an ``nbytes`` weight a timing loop must cycle through so that each call reads it
    from memory, as a decode step does (every weight once per token): together at least twice the last-level
    cache, at most ``budget`` bytes and ``max_copies`` copies (a weight so small that it needs more is timed by its
    call overhead, not by memory, and a million copies would only make the bench slow)."""
    need = -(-2 * last_level_cache_bytes() // max(1, nbytes))
    return max(1, min(need, budget // max(1, nbytes), max_copies))


class Cycle:
    """Call ``fn(item)`` on the next of ``items`` at each call: a weight that cannot stay in cache."""

    def __init__(self, fn: Callable[[object], object], items: list):
        self.fn, self.items, self.i = fn, items, 0

    def __call__(self) -> object:
        self.i = (self.i + 1) % len(self.items)
        return self.fn(self.items[self.i])
