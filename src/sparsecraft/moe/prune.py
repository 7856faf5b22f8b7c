"""Pruning MoE models with the ordinary engine: unfuse the experts, keep routers dense, report per-expert tokens.

``sparsecraft.prune`` is wrapped by ``moe_aware``: on a model without experts it is untouched; on a model with fused
experts it runs inside ``unfused_experts`` (statistics from routed tokens), excludes routers, and returns a
``MoEPruneResult``. To calibrate every expert on all tokens, unfuse explicitly around the call::

    with unfused_experts(model, calibrate="all"):
        result = sparsecraft.prune(model, "sparsegpt", 0.5, calibration=calib)
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from sparsecraft.engine.record import PruneResult
from sparsecraft.moe.fused import ExpertCounts, UnfusedExperts, find_fused_experts, unfused_experts

# Routers are never pruned: a zeroed router weight silently reroutes tokens. HF 5 routers are Parameters (not Linear)
# except Qwen2-MoE's shared_expert_gate (H -> 1); older/other MoEs name the router Linear "gate" or "router".
ROUTER_PATTERNS = ("*.gate", "*.router", "*.shared_expert_gate", "*.gate.*", "*.router.*")
REACHABLE_WARNING = 0.5  # warn when the pruned layers hold less than this fraction of all parameters


@dataclass
class MoEPruneResult(PruneResult):
    """A PruneResult plus what an MoE prune needs to say: tokens per expert and sparsity over all parameters."""

    calibrate: str = "routed"
    routed_tokens: dict[str, list[int]] = field(default_factory=dict)  # MoE fqn -> tokens routed to each expert
    seen_tokens: dict[str, list[int]] = field(default_factory=dict)  # MoE fqn -> tokens each expert's stats saw
    fallback_batches: dict[str, list[int]] = field(default_factory=dict)  # batches with no routed token
    total_parameters: int = 0

    @property
    def pruned_fraction(self) -> float:
        """Fraction of all model parameters that were in a pruned layer (reachable by the engine)."""
        return sum(m.numel() for m in self.masks.values()) / self.total_parameters if self.total_parameters else 0.0

    @property
    def sparsity_all(self) -> float:
        """Zeros made by the prune over ALL parameters (embeddings, norms, routers, ... included)."""
        zeros = sum(int((~m).sum()) for m in self.masks.values())
        return zeros / self.total_parameters if self.total_parameters else 0.0

    def summary(self) -> dict:
        return {**super().summary(), "sparsity_all_parameters": self.sparsity_all,
                "pruned_fraction": self.pruned_fraction, "expert_calibration": self.calibrate,
                "routed_tokens": self.routed_tokens, "seen_tokens": self.seen_tokens,
                "fallback_batches": self.fallback_batches}


def is_moe(model: nn.Module) -> bool:
    return bool(find_fused_experts(model)) or any(isinstance(m, UnfusedExperts) for m in model.modules())


def _delta(after: dict[str, list[int]], before: dict[str, list[int]]) -> dict[str, list[int]]:
    return {k: [a - b for a, b in zip(v, before.get(k, [0] * len(v)))] for k, v in after.items()}


def moe_result(result: PruneResult, model: nn.Module, counts: ExpertCounts,
               before: tuple[dict, dict, dict]) -> MoEPruneResult:
    """Wrap a PruneResult with the counters' increase since ``before`` and warn if little was reachable."""
    calibrate = next((m.calibrate for m in counts.modules.values()), "routed")
    out = MoEPruneResult(**{f.name: getattr(result, f.name) for f in fields(PruneResult)}, calibrate=calibrate,
                         routed_tokens=_delta(counts.routed(), before[0]), seen_tokens=_delta(counts.seen(), before[1]),
                         fallback_batches=_delta(counts.fallbacks(), before[2]),
                         total_parameters=sum(p.numel() for p in model.parameters()))
    if out.masks and out.pruned_fraction < REACHABLE_WARNING:
        warnings.warn(f"only {out.pruned_fraction:.1%} of the parameters were in prunable layers: the sparsity over "
                      f"all parameters is {out.sparsity_all:.4f}, not {out.sparsity:.4f}", stacklevel=3)
    return out


def moe_aware(prune: Callable[..., PruneResult]) -> Callable[..., PruneResult]:
    """Decorator for ``sparsecraft.prune``: MoE models get unfused experts, dense routers and a MoEPruneResult."""

    @functools.wraps(prune)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> PruneResult:
        if not is_moe(model):
            return prune(model, *args, **kwargs)
        kwargs["exclude"] = [*(kwargs.get("exclude") or []), *ROUTER_PATTERNS]
        already = not find_fused_experts(model)
        with (nullcontext(ExpertCounts({f: m for f, m in model.named_modules() if isinstance(m, UnfusedExperts)}))
              if already else unfused_experts(model)) as counts:
            before = (counts.routed(), counts.seen(), counts.fallbacks())
            result = prune(model, *args, **kwargs)
            return moe_result(result, model, counts, before)

    return wrapper
