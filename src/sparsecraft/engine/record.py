"""What a prune returns: explicit keep-masks and per-layer numbers."""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping
from dataclasses import asdict, dataclass, field

import numpy as np
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


class PackedMasks(MutableMapping):
    """fqn -> keep-mask (bool), held one bit per weight and unpacked on access. As torch.bool the masks of a
    model's blocks take as many bytes as it has pruned weights (101 MiB for SmolLM2-135M); packed, an eighth.

    A read returns a new tensor: assign it back (``masks[fqn] = keep``) to change a stored mask.
    """

    def __init__(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        self._bits: dict[str, tuple[np.ndarray, tuple[int, ...]]] = {}
        self.update(masks or {})

    def __setitem__(self, fqn: str, keep: torch.Tensor) -> None:
        flat = keep.detach().to("cpu", torch.bool).contiguous().reshape(-1).numpy()
        self._bits[fqn] = (np.packbits(flat, bitorder="little"), tuple(keep.shape))  # numpy: one C call

    def __getitem__(self, fqn: str) -> torch.Tensor:
        bits, shape = self._bits[fqn]
        flat = np.unpackbits(bits, count=math.prod(shape), bitorder="little").view(np.bool_)
        return torch.from_numpy(flat).reshape(shape)

    def __delitem__(self, fqn: str) -> None:
        del self._bits[fqn]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __repr__(self) -> str:
        return f"PackedMasks({len(self)} masks)"


@dataclass
class PruneResult:
    method: str
    pattern: str
    blocks: str  # fqn of the block list
    # fqn -> keep (module weight layout, bool), one bit per weight in memory
    masks: MutableMapping[str, torch.Tensor] = field(default_factory=PackedMasks)
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
