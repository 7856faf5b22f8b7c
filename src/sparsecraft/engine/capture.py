"""Catch the inputs of the first block, whatever the architecture passes (args AND kwargs)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


Calibration = torch.Tensor | Iterable[torch.Tensor] | Iterable[Mapping[str, torch.Tensor]]


def as_batches(calibration: Calibration, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Token ids (N, T), or a list of (T,)/(B, T) tensors, or a list of model-input dicts -> list of dicts."""
    if isinstance(calibration, torch.Tensor):
        if calibration.ndim != 2 or calibration.shape[0] == 0:
            raise ValueError(f"calibration token ids must have shape (nsamples, seqlen) with nsamples >= 1, "
                             f"got {tuple(calibration.shape)}")
        return [{"input_ids": chunk} for chunk in calibration.split(batch_size)]
    batches = []
    for item in calibration:
        if isinstance(item, torch.Tensor):
            batches.append({"input_ids": item if item.ndim == 2 else item.unsqueeze(0)})
        elif isinstance(item, Mapping) and "input_ids" in item:
            batches.append(dict(item))
        else:
            raise ValueError("each calibration item must be a tensor of token ids or a dict with 'input_ids'")
    if not batches:
        raise ValueError("the calibration set is empty; pass at least one batch of token ids")
    return batches


def move(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``; other objects pass through."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move(o, device) for o in obj)
    if isinstance(obj, list):
        return [move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockCall:
    """One calibration batch as the first block sees it; ``hidden`` is replaced block after block."""

    hidden: torch.Tensor  # (B, T, C)
    args: tuple  # positional args after the hidden states
    kwargs: dict  # attention masks, position ids, rotary embeddings, ...

    def run(self, block: nn.Module, device: torch.device | str) -> torch.Tensor:
        out = block(self.hidden.to(device), *move(self.args, device), **move(self.kwargs, device))
        return out[0] if isinstance(out, (tuple, list)) else out  # (B, T, C)


class _Caught(Exception):
    """Raised by the hook to stop the forward pass once block 0's inputs are stored."""


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | str, offload: torch.device | str = "cpu",
) -> list[BlockCall]:
    """Run the model up to ``first_block`` on each batch; return what the block received, stored on ``offload``."""
    calls: list[BlockCall] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs.pop("cache", None)  # no KV cache during calibration
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        calls.append(BlockCall(hidden.detach().to(offload), move(rest, offload), move(kwargs, offload)))
        raise _Caught

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**move(batch, device), use_cache=False)
                except _Caught:
                    pass
    finally:
        handle.remove()
    if not calls:
        raise ValueError("the calibration set is empty; pass at least one batch of token ids (e.g. nsamples >= 1)")
    return calls


def resolve_offload(offload: torch.device | str, device: torch.device | str, cache_bytes: int) -> torch.device:
    """Where cached block inputs live. ``"auto"``: on the compute device when it is a GPU with room for the cache
    three times over (the inputs, the block's outputs that replace them, headroom for the block), else on the CPU."""
    if str(offload) != "auto":
        return torch.device(offload)
    device = torch.device(device)
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if 3 * cache_bytes <= free else torch.device("cpu")


def auto_offload(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device | str,
                 dtype: torch.dtype) -> torch.device:
    """``resolve_offload("auto", ...)`` for the hidden states of ``batches`` (one (B, T, hidden) tensor each, in
    ``dtype``); the CPU when the model's config does not say its hidden size."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        return torch.device("cpu")
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    return resolve_offload("auto", device, tokens * hidden * torch.empty((), dtype=dtype).element_size())


@contextmanager
def outside_blocks_on(model: nn.Module, blocks_fqn: str, device: torch.device | str) -> Iterator[None]:
    """Move every parameter and buffer outside the block list (embeddings, rotary tables, ...) to ``device`` for
    the capture pass, and back afterwards; the blocks stay where they are (they move one at a time later)."""
    prefix = blocks_fqn + "."
    moved: list[tuple[torch.Tensor, torch.device]] = []
    tensors = [t for n, t in model.named_parameters() if not n.startswith(prefix)]
    tensors += [t for n, t in model.named_buffers() if not n.startswith(prefix)]
    try:
        for t in tensors:
            if t.device != torch.device(device):
                moved.append((t, t.device))
                t.data = t.data.to(device)
        yield
    finally:
        for t, home in moved:
            t.data = t.data.to(home)
