"""Peak memory of one phase of a run (not of the whole process, whose peak is usually the model load)."""

from __future__ import annotations

import os
import resource
import threading

import torch


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; falls back to the lifetime peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory() as pm: ...`` then ``pm.peak_rss`` (bytes, sampled every ``interval`` s) and
    ``pm.peak_cuda`` (bytes allocated by torch on the current CUDA device, 0 without CUDA)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start_rss = self.peak_rss = 0
        self.peak_cuda = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, rss_bytes())

    def __enter__(self) -> "PeakMemory":
        self.start_rss = self.peak_rss = rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_bytes())
        if torch.cuda.is_available():
            self.peak_cuda = torch.cuda.max_memory_allocated()

    @property
    def added_rss(self) -> int:
        """Peak minus the resident size at entry. The allocator keeps freed memory, so after an earlier phase (e.g. a
        perplexity pass) this understates what the phase needs; ``peak_rss`` is the number to trust."""
        return self.peak_rss - self.start_rss
