"""Structured pruning that physically shrinks a model: MLP neurons, KV groups of heads, hidden channels, blocks."""

from sparsecraft.structured.arch import AXES, SPECS, ArchSpec, spec_for
from sparsecraft.structured.shrink import ShrinkConfig, ShrinkResult, shrink

__all__ = ["AXES", "SPECS", "ArchSpec", "ShrinkConfig", "ShrinkResult", "shrink", "spec_for"]
