"""Train for activation sparsity: ReLU-fication of gated/GELU MLPs and ProSparse-style progressive L1.

ProSparse (https://arxiv.org/abs/2402.13516): replace the MLP activation by ReLU, then fine-tune with an L1 penalty on
the activation outputs whose factor rises in stages, smoothly inside each stage, so the model is not shocked by a
large penalty at once. Here the penalty is the mean |x| of the inputs of the MLP's down projection (the activation
output times the up projection for gated MLPs), collected by forward pre-hooks owned by a context manager.

DEFT-style density loss (Runwal et al., arXiv:2402.01911) as the option ``penalty="density"``: instead of the L1
magnitude, a smooth count of the non-zero inputs, mean tanh(beta |x|), which tends to the fraction of non-zeros (the
activation density) as beta grows and, unlike L1, stops pushing on inputs that are already zero-ish or large.
(A tanh surrogate of the L0 density; the paper's exact normalisation may differ.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sparsecraft.activation.measure import is_mlp_down, linear_targets
from sparsecraft.engine.blocks import find_blocks

ACT_ATTRS = ("act_fn", "act", "activation_fn")  # where HF MLPs keep their activation (LLaMA/Qwen, GPT-2, OPT/Phi)


def relufy_(model: nn.Module) -> list[str]:
    """Replace the activation module of every block's MLP by nn.ReLU, in place; returns the fqns replaced
    (empty when the MLPs already use ReLU)."""
    prefix, blocks = find_blocks(model)
    done, found = [], 0
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            for attr in ACT_ATTRS:
                act = getattr(module, attr, None)
                if not isinstance(act, nn.Module) or "attn" in name:
                    continue
                found += 1
                if not isinstance(act, nn.ReLU):  # an MLP that already uses ReLU (OPT) stays as it is
                    setattr(module, attr, nn.ReLU())
                    done.append(f"{prefix}.{i}.{name}.{attr}".replace("..", "."))
    if not found:
        raise ValueError(f"found no MLP activation module ({', '.join(ACT_ATTRS)}) in {type(model).__name__}'s "
                         f"blocks; ReLU-fication supports Hugging Face MLPs that keep their activation as a module")
    return done


@dataclass(frozen=True)
class ProSparseSchedule:
    """L1 factor per step: stage k ramps from factors[k-1] (0 before the first) to factors[k] over steps[k] steps
    with a half-cosine, then holds it; after the last stage the last factor holds."""

    steps: tuple[int, ...] = (100, 100, 100)  # steps per stage
    factors: tuple[float, ...] = (1e-3, 5e-3, 1e-2)  # factor reached at the end of each stage

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.factors) or not self.steps:
            raise ValueError(f"give one factor per stage: {len(self.steps)} stage lengths, {len(self.factors)} "
                             f"factors; e.g. steps=(100, 100), factors=(1e-3, 1e-2)")
        if any(n < 1 for n in self.steps) or any(f < 0 for f in self.factors):
            raise ValueError("stage lengths must be >= 1 and factors >= 0")

    def factor(self, step: int) -> float:
        start, before = 0, 0.0
        for n, f in zip(self.steps, self.factors):
            if step < start + n:
                p = (step - start) / n
                return before + (f - before) * (1 - math.cos(math.pi * p)) / 2
            start, before = start + n, f
        return self.factors[-1]


PENALTIES = ("l1", "density")


def density_penalty(x: torch.Tensor, beta: float = 10.0) -> torch.Tensor:
    """Smooth activation density: mean tanh(beta |x|) in [0, 1]; -> the fraction of non-zeros as beta -> inf."""
    return torch.tanh(beta * x.abs()).mean()


class ActivationL1:
    """The penalty (mean |x|, or the density surrogate) over the inputs of every MLP down projection seen since the
    last ``take()``, averaged over layers (keeps the graph)."""

    def __init__(self) -> None:
        self.terms: list[torch.Tensor] = []

    def take(self) -> torch.Tensor:
        if not self.terms:
            raise ValueError("no MLP activations were seen; run a forward pass inside l1_on_mlp_inputs(model)")
        value = torch.stack(self.terms).mean()
        self.terms = []
        return value


@contextmanager
def l1_on_mlp_inputs(model: nn.Module, penalty: str = "l1", beta: float = 10.0) -> Iterator[ActivationL1]:
    """Attach pre-hooks on the MLP down projections feeding an ActivationL1; always remove them. ``penalty``: "l1"
    (ProSparse, mean |x|) or "density" (DEFT-style, mean tanh(beta |x|))."""
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")
    if not beta > 0:
        raise ValueError(f"the density penalty's beta must be > 0, got {beta}")
    term = (lambda x: x.abs().mean()) if penalty == "l1" else (lambda x: density_penalty(x, beta))
    l1 = ActivationL1()
    downs = {f: m for f, m in linear_targets(model).items() if is_mlp_down(f, m, model)}
    handles = []
    try:
        for module in downs.values():
            handles.append(module.register_forward_pre_hook(lambda _m, args: l1.terms.append(term(args[0]))))
        yield l1
    finally:
        for h in handles:
            h.remove()


def exact_zero_fraction(model: nn.Module, windows: torch.Tensor) -> float:
    """Fraction of exact zeros entering the MLP down projections (the sparsity ReLU gives for free)."""
    counts: list[tuple[int, int]] = []
    downs = [m for f, m in linear_targets(model).items() if is_mlp_down(f, m, model)]
    handles = [m.register_forward_pre_hook(lambda _m, a: counts.append((int((a[0] == 0).sum()), a[0].numel())))
               for m in downs]
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return sum(z for z, _ in counts) / max(sum(n for _, n in counts), 1)
