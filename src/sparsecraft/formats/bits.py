"""Bit packing shared by the packed formats: little-endian bit order inside each byte.

Bit j of byte k holds element 8k + j of the last dimension, so ``pack_bits`` of a row of width L gives
ceil(L / 8) bytes and the pad bits of the last byte are 0.
"""

from __future__ import annotations

import torch


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool (..., L) -> uint8 (..., ceil(L / 8)); pure."""
    length = bits.shape[-1]
    pad = (-length) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad))  # (..., L + pad)
    b = b.reshape(*bits.shape[:-1], (length + pad) // 8, 8)  # (..., L8, 8)
    out = torch.zeros(b.shape[:-1], dtype=torch.uint8)
    for j in range(8):
        out |= b[..., j] << j
    return out


def unpack_bits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """uint8 (..., L8) -> bool (..., length); the inverse of ``pack_bits``."""
    shifts = torch.arange(8, dtype=torch.uint8)
    b = (packed.unsqueeze(-1) >> shifts) & 1  # (..., L8, 8)
    return b.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :length].bool()


def pack_uints(values: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative ints (K,) each < 2**width -> a flat little-endian bit stream, uint8 (ceil(K * width / 8),)."""
    shifts = torch.arange(width, dtype=torch.int64)
    bits = (values.to(torch.int64).unsqueeze(1) >> shifts) & 1  # (K, width)
    return pack_bits(bits.reshape(-1).bool())


def unpack_uints(stream: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_uints``: uint8 stream -> int64 (count,)."""
    bits = unpack_bits(stream, count * width).reshape(count, width).to(torch.int64)  # (K, width)
    return (bits << torch.arange(width, dtype=torch.int64)).sum(1)


def encode_name(name: str) -> torch.Tensor:
    """A format name as a uint8 tensor, so that a safetensors file describes itself."""
    return torch.tensor(list(name.encode("ascii")), dtype=torch.uint8)


def decode_name(t: torch.Tensor) -> str:
    return bytes(t.to(torch.uint8).tolist()).decode("ascii")
