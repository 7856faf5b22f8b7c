"""Fused expert tensors <-> per-expert ``nn.Linear`` layers, so the engine prunes every expert like any Linear.

transformers 5 stores the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 (and others built
with ``@use_experts_implementation``) as two 3-D parameters of one ``...Experts`` module:

    gate_up_proj  (E, 2I, H)   rows [0, I) = gate, rows [I, 2I) = up  ("concatenated" layout)
    down_proj     (E, H, I)

and calls it as ``experts(hidden (N, H), top_k_index (N, k), top_k_weights (N, k)) -> (N, H)``. The engine only sees
``nn.Linear``, so it pruned none of these (a tiny Mixtral reported "0.5000" with 11% of its block weights pruned).

``unfused_experts(model)`` swaps each such module for an ``UnfusedExperts`` holding one ``ExpertMLP`` per expert
(``gate_proj``, ``up_proj``, ``down_proj``; same math, same routing), so forward hooks on an expert's Linear layers
see exactly the tokens routed to that expert. The Linear weights are VIEWS of the fused storage on the model's own
device, and on exit every expert's weights are copied back into the fused tensors anyway (they may have been moved to
another device by the engine), and the original module is put back. Masks and records of expert layers are keyed

    <moe fqn>.experts.<e>.gate_proj | up_proj | down_proj      e.g. model.layers.0.mlp.experts.3.gate_proj

with masks in (out, in) = (I, H) for gate/up and (H, I) for down: ``gate_up_proj[e] == cat(gate, up)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

CALIBRATION_MODES = ("routed", "all")


def _fused_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.ndim == 3 and down.ndim == 3:
        return gate_up, down
    return None


def _check_layout(fqn: str, module: nn.Module) -> None:
    """Only the default layout (concatenated [gate; up], (out, in) per expert, no bias, gated) is unfused."""
    odd = [flag for flag, bad in (("is_transposed", True), ("has_bias", True), ("has_gate", False),
                                  ("is_concatenated", False), ("has_post_expert_norm", True))
           if getattr(module, flag, not bad) == bad]
    gate_up, down = _fused_params(module)
    E, two_i, H = gate_up.shape
    if odd or two_i % 2 or tuple(down.shape) != (E, H, two_i // 2) or not hasattr(module, "act_fn"):
        raise ValueError(f"fused experts at {fqn} ({type(module).__name__}) use a layout sparsecraft cannot unfuse "
                         f"yet ({', '.join(odd) or 'unexpected shapes'}); exclude them with exclude=['{fqn}*'] or "
                         f"open an issue with the model id")


def find_fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """fqn -> fused experts module (3-D ``gate_up_proj`` and ``down_proj`` parameters)."""
    return {fqn: m for fqn, m in model.named_modules() if _fused_params(m) is not None}


class ExpertMLP(nn.Module):
    """One routed expert as plain Linear layers: down(act(gate(x)) * up(x))."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, H) -> (n, H)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear_view(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear whose weight shares storage with ``weight`` (out, in): no copy of the expert tensors."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


class UnfusedExperts(nn.Module):
    """Drop-in for a fused experts module: children "0".."E-1" are ExpertMLPs; same call signature and result.

    ``calibrate="routed"`` runs each expert on its routed tokens only (their statistics); ``"all"`` runs every
    expert on every token so its statistics see all of them (the output still uses only the routed rows, weighted
    by the router, so the propagated activations are unchanged). In "routed" mode an expert that gets no token of a
    batch is calibrated on that whole batch (else its statistics would be empty); ``fallback_batches`` counts it.
    Counters only advance while a forward hook is attached to the expert (the engine's statistics pass).
    """

    def __init__(self, experts: list[ExpertMLP], calibrate: str = "routed") -> None:
        super().__init__()
        if calibrate not in CALIBRATION_MODES:
            raise ValueError(f"calibrate must be one of {CALIBRATION_MODES}, got {calibrate!r}")
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.num_experts = len(experts)
        self.calibrate = calibrate
        self.routed_tokens = torch.zeros(len(experts), dtype=torch.long)  # tokens routed while hooked
        self.seen_tokens = torch.zeros(len(experts), dtype=torch.long)  # tokens the statistics saw
        self.fallback_batches = torch.zeros(len(experts), dtype=torch.long)

    @classmethod
    def from_fused(cls, fused: nn.Module, calibrate: str = "routed") -> UnfusedExperts:
        gate_up, down = (p.detach() for p in _fused_params(fused))  # (E, 2I, H), (E, H, I)
        inter = gate_up.shape[1] // 2
        experts = [ExpertMLP(_linear_view(gate_up[e, :inter]), _linear_view(gate_up[e, inter:]),
                             _linear_view(down[e]), fused.act_fn) for e in range(gate_up.shape[0])]
        return cls(experts, calibrate)

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    def fuse_into_(self, fused: nn.Module) -> None:
        """Copy every expert's (possibly pruned) weights back into the fused tensors, in place."""
        gate_up, down = _fused_params(fused)
        inter = gate_up.shape[1] // 2
        with torch.no_grad():
            for e in range(self.num_experts):
                ex = self.expert(e)
                for dst, src in ((gate_up[e, :inter], ex.gate_proj.weight), (gate_up[e, inter:], ex.up_proj.weight),
                                 (down[e], ex.down_proj.weight)):
                    if dst.data_ptr() != src.data_ptr():
                        dst.copy_(src)

    def _hooked(self, ex: ExpertMLP) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in (ex.gate_proj, ex.up_proj, ex.down_proj))

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)  # (N, H)
        for e in range(self.num_experts):
            ex = self.expert(e)
            token, slot = torch.where(top_k_index == e)  # (n_e,), (n_e,); DeepSeek's masked slots (== E) never match
            hooked = self._hooked(ex)
            run_all = hooked and (self.calibrate == "all" or token.numel() == 0)
            if hooked:
                self.routed_tokens[e] += token.numel()
                self.seen_tokens[e] += hidden.shape[0] if run_all else token.numel()
                self.fallback_batches[e] += int(run_all and self.calibrate == "routed")
            if run_all:
                y = ex(hidden)[token]  # rows are independent: the routed rows equal ex(hidden[token])
            elif token.numel():
                y = ex(hidden[token])  # (n_e, H)
            else:
                continue
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


@dataclass
class ExpertCounts:
    """Per MoE module fqn: tokens routed to each expert and tokens its statistics saw, during hooked passes."""

    modules: dict[str, UnfusedExperts] = field(default_factory=dict)

    def routed(self) -> dict[str, list[int]]:
        return {fqn: m.routed_tokens.tolist() for fqn, m in self.modules.items()}

    def seen(self) -> dict[str, list[int]]:
        return {fqn: m.seen_tokens.tolist() for fqn, m in self.modules.items()}

    def fallbacks(self) -> dict[str, list[int]]:
        return {fqn: m.fallback_batches.tolist() for fqn, m in self.modules.items()}


def _swap(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_fqn, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent_fqn) if parent_fqn else model, name, new)


@contextmanager
def unfused_experts(model: nn.Module, calibrate: str = "routed") -> Iterator[ExpertCounts]:
    """Replace every fused experts module by an UnfusedExperts for the duration; always fuse back and restore.

    Yields the token counters. Modules already unfused (a nested call) are counted, not swapped again.
    """
    fused = find_fused_experts(model)
    for fqn, module in fused.items():
        _check_layout(fqn, module)
    swapped: dict[str, tuple[nn.Module, UnfusedExperts]] = {}
    counts = ExpertCounts({f: m for f, m in model.named_modules() if isinstance(m, UnfusedExperts)})
    try:
        for fqn, module in fused.items():
            unfused = UnfusedExperts.from_fused(module, calibrate)
            _swap(model, fqn, unfused)
            swapped[fqn] = (module, unfused)
            counts.modules[fqn] = unfused
        yield counts
    finally:
        for fqn, (module, unfused) in swapped.items():
            unfused.fuse_into_(module)
            _swap(model, fqn, module)
