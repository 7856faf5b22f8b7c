"""From a parameter budget to uniform widths: one keep fraction f for every chosen axis, rounded per axis, found by
bisection on the exact parameter count of the resulting config (counted on the meta device, so tied embeddings,
biases and norms are all counted as transformers builds them)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sparsecraft.engine.blocks import find_blocks
from sparsecraft.structured.arch import ArchSpec, ffn_width, head_dim, kv_heads


@dataclass(frozen=True)
class Sizes:
    """Uniform widths of a model: MLP neurons per block, KV groups per block, hidden channels, blocks."""

    mlp: int
    heads: int  # KV groups (each = num_attention_heads // num_key_value_heads query heads + 1 KV head)
    hidden: int
    depth: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def dense_sizes(model: nn.Module, spec: ArchSpec) -> Sizes:
    cfg = model.config
    _, blocks = find_blocks(model)
    groups = kv_heads(cfg) if spec.width_ok else 0
    return Sizes(mlp=ffn_width(cfg, spec), heads=groups, hidden=int(cfg.hidden_size), depth=len(blocks))


def sizes_at(dense: Sizes, axes: tuple[str, ...], f: float, heads_per_group: int = 1) -> Sizes:
    """Keep round(f * n) (at least 1) units of every axis in ``axes``; others stay dense. The hidden size stays a
    multiple of the query-head count: transformers' config validators refuse anything else, even with head_dim set."""
    d = {a: max(1, round(f * n)) if a in axes else n for a, n in dense.as_dict().items()}
    if "hidden" in axes:
        q = d["heads"] * heads_per_group
        d["hidden"] = max(q, round(f * dense.hidden / q) * q)
    return Sizes(**d)


def sized_config(config: Any, spec: ArchSpec, sizes: Sizes, overrides: dict[str, Any] | None = None) -> Any:
    """A copy of ``config`` describing a model of ``sizes`` (explicit head_dim where heads/hidden can change)."""
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    r = cfg.num_attention_heads // kv_heads(cfg) if spec.width_ok else 1
    if spec.width_ok:
        cfg.head_dim = head_dim(config)
        cfg.num_key_value_heads = sizes.heads
        cfg.num_attention_heads = sizes.heads * r
        cfg.hidden_size = sizes.hidden
    setattr(cfg, spec.ffn_key, sizes.mlp)
    types = getattr(cfg, "layer_types", None)
    if types:
        cfg.layer_types = list(types[: sizes.depth])  # placeholder list of the right length (counting only)
    cfg.num_hidden_layers = sizes.depth
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    return cfg


def count_params(config: Any) -> int:
    """Parameters of the model ``config`` builds (shared tensors once), without allocating any weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def plan(model: nn.Module, spec: ArchSpec, axes: tuple[str, ...], target: float, tolerance: float = 0.02,
         overrides: dict[str, Any] | None = None) -> tuple[Sizes, int, int]:
    """-> (sizes, their parameter count, the dense count) closest to ``target`` * dense parameters.

    Raises ValueError when no uniform width on ``axes`` lands within ``tolerance`` (a fraction of the dense count)."""
    dense = dense_sizes(model, spec)
    r = model.config.num_attention_heads // kv_heads(model.config) if spec.width_ok else 1
    cache: dict[Sizes, int] = {}

    def params(s: Sizes) -> int:
        if s not in cache:
            cache[s] = count_params(sized_config(model.config, spec, s, overrides))
        return cache[s]

    total = sum(p.numel() for p in model.parameters())
    goal = target * total
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-4:  # params(sizes_at(f)) is non-decreasing in f
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if params(sizes_at(dense, axes, mid, r)) >= goal else (mid, hi)
    best = min((sizes_at(dense, axes, f, r) for f in (lo, hi)), key=lambda s: abs(params(s) - goal))
    if abs(params(best) - goal) > tolerance * total:
        near = sorted({round(params(sizes_at(dense, axes, f, r)) / total, 3) for f in (lo, hi)})
        raise ValueError(f"--params {target} is not reachable with uniform widths on axes {','.join(axes)}: the "
                         f"nearest reachable fractions are {near} (the smallest is "
                         f"{params(sizes_at(dense, axes, 0.0, r)) / total:.3f}); pass one of those or add axes")
    return best, params(best), total
