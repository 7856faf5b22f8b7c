"""Mixture of experts: prune fused experts per expert, remove / merge whole experts, turn dense MLPs into MoE.

fused.py    fused 3-D expert tensors <-> per-expert nn.Linear views (``unfused_experts``)
prune.py    ``moe_aware`` (wraps ``sparsecraft.prune``), MoEPruneResult, router exclusion
"""

from sparsecraft.moe.fused import ExpertMLP, UnfusedExperts, find_fused_experts, unfused_experts
from sparsecraft.moe.prune import ROUTER_PATTERNS, MoEPruneResult, is_moe, moe_aware

__all__ = ["ROUTER_PATTERNS", "ExpertMLP", "MoEPruneResult", "UnfusedExperts", "find_fused_experts", "is_moe",
           "moe_aware", "unfused_experts"]
