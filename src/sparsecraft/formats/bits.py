"""Bit streams and names shared by the packed formats, and the checks every ``from_tensors`` runs.

The bit order is the bitmask's (``sparsecraft.kernels.layout.pack_bits``): bit j of byte k holds element 8k + j.
"""

from __future__ import annotations

import torch

from sparsecraft.kernels.layout import pack_bits, unpack_bits

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_NAME = 64  # format names are short ASCII strings
MAX_ELEMENTS = 2**32  # a weight read without a model to compare against may not claim more (e.g. 65536 x 65536)


def pack_uints(values: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative ints (K,) each < 2**width -> a flat little-endian bit stream, uint8 (ceil(K * width / 8),)."""
    shifts = torch.arange(width, dtype=torch.int64)
    bits = (values.to(torch.int64).unsqueeze(1) >> shifts) & 1  # (K, width)
    return pack_bits(bits.reshape(-1).bool())


def unpack_uints(stream: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_uints``: uint8 stream -> int64 (count,)."""
    bits = unpack_bits(stream, count * width).reshape(count, width).to(torch.int64)  # (K, width)
    return (bits << torch.arange(width, dtype=torch.int64)).sum(1)


def dense_from_kept(keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """keep (rows, cols) bool and its kept values (nnz,) row-major -> the dense weight, zeros where not kept."""
    dense = torch.zeros(keep.shape, dtype=values.dtype)
    dense[keep] = values
    return dense


def encode_name(name: str) -> torch.Tensor:
    """A format name as a uint8 tensor, so that a safetensors file describes itself."""
    return torch.tensor(list(name.encode("ascii")), dtype=torch.uint8)


def decode_name(t: torch.Tensor, name: str = "format") -> str:
    if t.dtype != torch.uint8 or t.dim() != 1 or not 0 < t.numel() <= MAX_NAME:
        fail(name, f"expected a uint8 (<= {MAX_NAME},) format name, got {t.dtype} {tuple(t.shape)}")
    try:
        return bytes(t.tolist()).decode("ascii")
    except UnicodeDecodeError:
        fail(name, "the format name is not ASCII")
    raise AssertionError  # unreachable: fail raises


def fail(name: str, what: str) -> None:
    """One error naming the tensor and what is wrong with it."""
    raise ValueError(f"{name}: {what}; the file is corrupt or was not written by sparsecraft (re-run `sparsecraft "
                     f"pack` or `prune` to rebuild it)")


def expect_keys(d: dict[str, torch.Tensor], required: set[str], optional: set[str], name: str) -> None:
    """Exactly the known entries: a missing one or an unknown one is an error."""
    missing, unknown = required - set(d), set(d) - required - optional
    if missing:
        fail(name, f"missing entries {sorted(missing)}")
    if unknown:
        fail(name, f"unknown entries {sorted(unknown)}")


def expect(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...]) -> None:
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        want = "|".join(str(d).removeprefix("torch.") for d in dtypes)
        fail(name, f"expected {want} {tuple(shape)}, got {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}")


def read_pair(t: torch.Tensor, name: str, minimum: int = 1) -> tuple[int, int]:
    """An int64 (2,) entry (a shape or a pattern) -> two ints, each >= ``minimum`` and below 2**31."""
    expect(t, name, (torch.int64,), (2,))
    a, b = (int(v) for v in t.tolist())
    if not (minimum <= a < 2**31 and minimum <= b < 2**31):
        fail(name, f"values {a}, {b} out of range [{minimum}, 2**31)")
    return a, b


def check_shape(shape: tuple[int, int], expected: tuple[int, int] | None, name: str) -> None:
    if expected is not None and tuple(shape) != tuple(expected):
        fail(name, f"shape {tuple(shape)} does not match the model's weight {tuple(expected)}")
    if shape[0] * shape[1] > MAX_ELEMENTS:
        fail(name, f"shape {tuple(shape)} has more than {MAX_ELEMENTS} elements")
