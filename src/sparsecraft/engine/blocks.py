"""Find the repeated blocks of a model and the prunable layers inside them, from metadata, not model names."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

# Only where `_no_split_modules` does not name the block class. Keyed by model class name, value = block list fqn.
BLOCK_OVERRIDES: dict[str, str] = {}


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D (weight stored (in, out)); detected by class name to avoid importing transformers here."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the module's storage layout (a view for Conv1D)."""
    return module.weight.T if is_conv1d(module) else module.weight


def set_weight_2d_(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out, in) weight back in the module's own layout, in place, keeping dtype and device."""
    target = module.weight
    with torch.no_grad():
        target.copy_(weight.T if is_conv1d(module) else weight)


def to_module_layout(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """An (out, in) tensor (e.g. a keep-mask) in the layout of ``module.weight``."""
    return t.T.contiguous() if is_conv1d(module) else t


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (fqn, ModuleList) of the model's repeated blocks.

    Order of evidence: BLOCK_OVERRIDES by class name; then the ModuleList whose children are of a class named in
    ``model._no_split_modules`` (Hugging Face metadata); then the longest ModuleList of >= 2 same-class children.
    """
    lists = {fqn: m for fqn, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0}
    override = BLOCK_OVERRIDES.get(type(model).__name__)
    if override is not None and override in lists:
        return override, lists[override]
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    tagged = [(fqn, m) for fqn, m in lists.items() if type(m[0]).__name__ in no_split]
    if tagged:
        return max(tagged, key=lambda item: len(item[1]))
    uniform = [(fqn, m) for fqn, m in lists.items() if len(m) >= 2 and len({type(c) for c in m}) == 1]
    if uniform:
        return max(uniform, key=lambda item: len(item[1]))
    raise ValueError(
        f"{type(model).__name__} has no repeated blocks (no nn.ModuleList of identical layers); sparsecraft's "
        f"engine needs a model made of repeated blocks. If your model has them under another container, add its "
        f"fqn to sparsecraft.engine.blocks.BLOCK_OVERRIDES[{type(model).__name__!r}]"
    )


def find_targets(
    block: nn.Module, prefix: str, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, nn.Module]:
    """Prunable layers of ``block`` keyed by full fqn, filtered by fnmatch patterns on the fqn."""
    found = {}
    for name, module in block.named_modules():
        fqn = f"{prefix}.{name}" if name else prefix
        if not is_prunable(module):
            continue
        if include and not any(fnmatch.fnmatchcase(fqn, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(fqn, p) for p in exclude):
            continue
        found[fqn] = module
    return found


def layers_by_block(model: nn.Module, include: list[str] | None = None,
                    exclude: list[str] | None = None) -> dict[str, dict[str, nn.Module]]:
    """block fqn -> {layer fqn: module}: the layers the engine would prune, in block order."""
    blocks_fqn, blocks = find_blocks(model)
    return {f"{blocks_fqn}.{i}": find_targets(b, f"{blocks_fqn}.{i}", include, exclude) for i, b in enumerate(blocks)}


def prunable_layers(model: nn.Module, include: list[str] | None = None,
                    exclude: list[str] | None = None) -> dict[str, nn.Module]:
    """fqn -> module of every layer the engine would prune, in block order."""
    return {f: m for targets in layers_by_block(model, include, exclude).values() for f, m in targets.items()}
