"""The one architecture-agnostic, layer-wise one-shot engine."""

from sparsecraft.engine.blocks import find_blocks, find_targets
from sparsecraft.engine.loop import run_oneshot

__all__ = ["find_blocks", "find_targets", "run_oneshot"]
