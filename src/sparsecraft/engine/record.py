"""What a prune returns: explicit keep-masks and per-layer numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class LayerRecord:
    fqn: str
    shape: tuple[int, int]  # (out, in)
    target_sparsity: float
    sparsity: float  # realized: zeros of the keep-mask / numel
    error: float  # relative reconstruction error on calibration inputs: tr(dW H dW^T) / tr(W H W^T)
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneResult:
    method: str
    pattern: str
    blocks: str  # fqn of the block list
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # fqn -> keep (module weight layout, bool)
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        """Realized sparsity over all pruned layers (parameter-weighted)."""
        total = sum(m.numel() for m in self.masks.values())
        zeros = sum(int((~m).sum()) for m in self.masks.values())
        return zeros / total if total else 0.0

    def summary(self) -> dict:
        return {"method": self.method, "pattern": self.pattern, "blocks": self.blocks,
                "sparsity": self.sparsity, "seconds": self.seconds,
                "layers": {k: v.to_dict() for k, v in self.layers.items()}}


class PartialPruneError(ValueError):
    """A block failed after earlier blocks were pruned; the failing block itself was restored."""

    def __init__(self, message: str, result: PruneResult, pruned_blocks: list[int]) -> None:
        super().__init__(message)
        self.result = result
        self.pruned_blocks = pruned_blocks
