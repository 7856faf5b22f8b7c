"""The one module-swap helper: every sparse module replaces a dense one through here."""

from __future__ import annotations

from torch import nn


def swap_module_(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``fqn`` by ``new``, in place; returns the module it replaced."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
