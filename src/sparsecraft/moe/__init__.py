"""Mixture of experts: prune fused experts per expert, remove / merge whole experts, turn dense MLPs into MoE.

fused.py    fused 3-D expert tensors <-> per-expert nn.Linear views (``unfused_experts``)
prune.py    ``moe_aware`` (wraps ``sparsecraft.prune``), MoEPruneResult, router exclusion
experts.py  REAP expert removal and output-similarity merging -> a plain smaller HF model (``reduce_experts``)
moefy.py    dense gated MLPs -> MoEMLP (balanced k-means over co-activation, fitted router), save / load
router_train.py  distil the dense model into the MoE: routers (straight-through top-k), optionally the experts
refit.py    closed-form ridge refit of the experts' down projections for the routing (training-free compensation)
"""

from sparsecraft.moe.fused import ExpertMLP, UnfusedExperts, find_fused_experts, unfused_experts
from sparsecraft.moe.experts import ExpertConfig, ExpertResult, expert_statistics, reduce_experts
from sparsecraft.moe.moefy import MoEfyConfig, MoEfyResult, load_moefied, moefy_, save_moefied, set_top_k_
from sparsecraft.moe.refit import refit_down_
from sparsecraft.moe.router_train import RouterTrainConfig, train_routers_
from sparsecraft.moe.prune import ROUTER_PATTERNS, MoEPruneResult, is_moe, moe_aware

__all__ = ["ROUTER_PATTERNS", "ExpertConfig", "ExpertMLP", "ExpertResult", "MoEPruneResult", "MoEfyConfig",
           "MoEfyResult", "UnfusedExperts", "expert_statistics", "find_fused_experts", "is_moe", "load_moefied",
           "moe_aware", "moefy_", "reduce_experts", "refit_down_", "RouterTrainConfig", "save_moefied", "set_top_k_",
           "train_routers_", "unfused_experts"]
