"""MaskState: keep-masks over Linear / Conv2d / Embedding weights that survive training.

Each mask lives as a persistent ``torch.bool`` buffer named ``weight_keep`` on the module it masks, so it is in
``model.state_dict()``, moves with ``model.to(device)``, and is broadcast by DDP like any other buffer. The
object owns three kinds of hooks, all removable with :meth:`MaskState.remove`:

- a gradient hook on every masked weight: the gradient of a pruned weight is set to exactly 0;
- an optimizer step post-hook (:meth:`bind`): after every ``optimizer.step()`` the pruned weights are set to
  exactly 0 again (momentum and decoupled weight decay can otherwise move them);
- nothing else: the model's forward is not touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

KEEP_BUFFER = "weight_keep"
TARGET_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Embedding)


def maskable_modules(
    model: nn.Module,
    types: tuple[type[nn.Module], ...] = TARGET_TYPES,
    exclude: Sequence[str] = (),
) -> list[str]:
    """Fqns of every module of ``types`` anywhere in ``model`` (in module order; training masks any model, with or
    without repeated blocks), minus those matching an ``exclude`` fnmatch pattern (e.g. ``exclude=("lm_head",)``).
    The one-shot engine's ``engine.blocks.find_targets`` looks inside blocks only."""
    return [
        fqn
        for fqn, module in model.named_modules()
        if fqn and isinstance(module, types) and not any(fnmatch(fqn, x) for x in exclude)
    ]


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor viewed as (out, in * kernel): the layout ``topk_mask`` compares in."""
    return t.reshape(t.shape[0], -1)


class MaskState:
    """Masks for the modules ``fqns`` of ``model`` (default: every Linear, Conv2d and Embedding).

    ``keep`` gives initial masks by fqn (missing fqns start all-True). Masks are applied to the weights at once.
    Use it as a context manager, or call :meth:`remove`, to take the hooks and buffers off again.
    """

    def __init__(
        self,
        model: nn.Module,
        keep: Mapping[str, torch.Tensor] | None = None,
        fqns: Sequence[str] | None = None,
    ) -> None:
        keep = dict(keep or {})
        self.fqns: list[str] = list(fqns) if fqns is not None else (sorted(keep) if keep else maskable_modules(model))
        if not self.fqns:
            raise ValueError("no modules to mask: pass fqns=[...] or a model with Linear/Conv2d/Embedding layers")
        unknown = sorted(set(keep) - set(self.fqns))
        if unknown:
            raise ValueError(f"masks given for modules that are not targets: {unknown}; add them to fqns")
        self.modules: dict[str, nn.Module] = {}
        self.record_grads = False  # when True the grad hooks keep a copy of the dense gradient (RigL)
        self.dense_grads: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        for fqn in self.fqns:
            self._attach(model, fqn, keep.get(fqn))
        self.apply_()

    # --- attaching and detaching -------------------------------------------------------------------------
    def _attach(self, model: nn.Module, fqn: str, keep: torch.Tensor | None) -> None:
        module = model.get_submodule(fqn)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise ValueError(f"module {fqn!r} ({type(module).__name__}) has no weight parameter to mask")
        if hasattr(module, KEEP_BUFFER):
            raise ValueError(f"module {fqn!r} already carries a {KEEP_BUFFER!r} buffer: remove the old MaskState first")
        if keep is None:
            keep = torch.ones_like(weight, dtype=torch.bool)
        if keep.shape != weight.shape or keep.dtype != torch.bool:
            raise ValueError(
                f"mask for {fqn!r} must be a torch.bool tensor of shape {tuple(weight.shape)} (True = keep), "
                f"got {keep.dtype} {tuple(keep.shape)}"
            )
        module.register_buffer(KEEP_BUFFER, keep.detach().clone().to(weight.device), persistent=True)
        self.modules[fqn] = module
        self._handles.append(weight.register_hook(self._grad_hook(fqn, module)))

    def _grad_hook(self, fqn: str, module: nn.Module) -> Any:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            keep = getattr(module, KEEP_BUFFER)
            if grad.is_sparse:  # nn.Embedding(sparse=True): rows indexed by grad.indices()[0]
                grad = grad.coalesce()
                rows = grad.indices()[0]
                if self.record_grads:
                    self.dense_grads[fqn] = grad.detach().to_dense()
                values = grad.values().masked_fill(~keep[rows], 0.0)
                return torch.sparse_coo_tensor(grad.indices(), values, grad.shape, is_coalesced=True,
                                               check_invariants=False)
            if self.record_grads:
                self.dense_grads[fqn] = grad.detach().clone()
            return grad.masked_fill(~keep, 0.0)

        return hook

    def bind(self, optimizer: torch.optim.Optimizer) -> MaskState:
        """Re-apply the masks after every ``optimizer.step()`` (hook removed by :meth:`remove`)."""
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply_()))
        return self

    def remove(self, drop_buffers: bool = True) -> None:
        """Remove every hook this object registered and (by default) the mask buffers; weights stay as they are."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if drop_buffers:
            for module in self.modules.values():
                if KEEP_BUFFER in module._buffers:
                    del module._buffers[KEEP_BUFFER]
        self.dense_grads.clear()

    def __enter__(self) -> MaskState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- masks ---------------------------------------------------------------------------------------------
    def keep(self, fqn: str) -> torch.Tensor:
        """The live mask buffer of ``fqn`` (do not modify it directly: use :meth:`set_keep_`)."""
        return getattr(self.modules[fqn], KEEP_BUFFER)

    def weight(self, fqn: str) -> nn.Parameter:
        return self.modules[fqn].weight

    def masks(self) -> dict[str, torch.Tensor]:
        """A copy of every mask, by fqn (CPU tensors)."""
        return {fqn: self.keep(fqn).detach().cpu().clone() for fqn in self.fqns}

    @torch.no_grad()
    def set_keep_(self, fqn: str, keep: torch.Tensor) -> None:
        """Replace the mask of ``fqn`` in place and zero the weights it prunes."""
        buf = self.keep(fqn)
        if keep.shape != buf.shape or keep.dtype != torch.bool:
            raise ValueError(f"mask for {fqn!r} must be torch.bool of shape {tuple(buf.shape)}, got {keep.dtype} "
                             f"{tuple(keep.shape)}")
        buf.copy_(keep)
        self.weight(fqn).masked_fill_(~buf, 0.0)

    @torch.no_grad()
    def apply_(self) -> None:
        """Set every pruned weight to exactly 0."""
        for fqn in self.fqns:
            self.weight(fqn).masked_fill_(~self.keep(fqn), 0.0)

    def load_masks_(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Set the masks of the fqns in ``masks`` (e.g. from :meth:`masks` or a safetensors file)."""
        for fqn, keep in masks.items():
            if fqn not in self.modules:
                raise ValueError(f"{fqn!r} is not masked by this MaskState; targets are {self.fqns[:5]}...")
            self.set_keep_(fqn, keep.to(self.keep(fqn).device))

    # --- numbers ---------------------------------------------------------------------------------------------
    def numel(self) -> dict[str, int]:
        return {fqn: self.keep(fqn).numel() for fqn in self.fqns}

    def zeros(self) -> dict[str, int]:
        """Pruned count per fqn (from the masks)."""
        return {fqn: int((~self.keep(fqn)).sum()) for fqn in self.fqns}

    def layer_sparsity(self) -> dict[str, float]:
        return {fqn: z / self.keep(fqn).numel() for fqn, z in self.zeros().items()}

    def sparsity(self) -> float:
        """Fraction of masked-out weights over all targets (weighted by parameter count)."""
        return sum(self.zeros().values()) / sum(self.numel().values())

    # --- distributed ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> None:
        """Make every rank's masks equal to rank ``src``'s (no-op without an initialised process group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for fqn in self.fqns:
            buf = self.keep(fqn)
            wire = buf.to(torch.uint8)  # gloo has no bool all-reduce/broadcast on every build
            dist.broadcast(wire, src=src)
            buf.copy_(wire.bool())
        self.apply_()

    # --- construction from saved state ----------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> MaskState:
        """Re-attach masks saved in a model state dict (keys ``<fqn>.weight_keep``) to a fresh ``model``."""
        suffix = "." + KEEP_BUFFER
        keep = {k[: -len(suffix)]: v.bool() for k, v in state_dict.items() if k.endswith(suffix)}
        if not keep:
            raise ValueError(f"no '*{suffix}' keys in the state dict: it was not saved with a MaskState attached")
        return cls(model, keep=keep)

