"""Quality and speed of a model as sparsecraft runs it: perplexity (exp of the mean next-token negative
log-likelihood over every predicted token) and greedy-decode tokens/s (dense vs packed, interleaved in one run)."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsecraft.kernels import isa_scope
from sparsecraft.modules import SparseLinear, swap_module_
from sparsecraft.patterns import Pattern


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               device: torch.device | str | None = None, progress: bool = False) -> float:
    """windows (n, T) token ids; each window is scored independently (T - 1 predictions per window)."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"perplexity needs token windows of shape (n, seqlen) with n >= 1, got {tuple(windows.shape)}")
    device = device or next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        target = batch[:, 1:]  # (B, T-1)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count)


def greedy_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int, isa: str | None = None
                  ) -> tuple[torch.Tensor, float]:
    """Greedy decoding of ``new_tokens`` after the prompt ``ids`` (1, T) -> (generated ids (1, new_tokens), decode
    tokens/s excluding the prompt's prefill). The KV cache is a ``DynamicCache`` passed as ``cache=`` (transformers
    5.24 renamed ``past_key_values``); the sparse kernels run on ``isa`` (default: this CPU's best)."""
    from transformers import DynamicCache

    scope = isa_scope(isa) if isa else contextlib.nullcontext()
    with torch.inference_mode(), scope:
        cache = DynamicCache(config=model.config)
        out = model(ids, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [nxt]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(nxt, cache=cache, use_cache=True)  # the cache object grows in place
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
        seconds = time.perf_counter() - start
    return torch.cat(tokens, 1), (new_tokens - 1) / max(seconds, 1e-9)


def decode_race(models: Mapping[str, nn.Module | tuple[nn.Module, str | None]], ids: torch.Tensor, new_tokens: int,
                rounds: int, contexts: Mapping[str, Callable[[], AbstractContextManager]] | None = None
                ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Greedy-decode every model (or (model, kernel isa)) ``rounds`` times, interleaved so that machine noise hits
    all alike -> (median decode tokens/s per name, the generated ids per name). ``contexts[name]()`` (optional) is
    entered around each decode of that entry, e.g. to swap modules in and out of a shared model."""
    entries = {name: m if isinstance(m, tuple) else (m, None) for name, m in models.items()}
    contexts = contexts or {}
    rates: dict[str, list[float]] = {name: [] for name in entries}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        for name, (model, isa) in entries.items():
            with contexts.get(name, contextlib.nullcontext)():
                outs[name], rate = greedy_decode(model, ids, new_tokens, isa)
            rates[name].append(rate)
    return {name: statistics.median(r) for name, r in rates.items()}, outs


@contextlib.contextmanager
def swapped_in(model: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """Inside the block, ``model`` runs with ``modules`` (fqn -> module) in place of its own; restored on exit."""
    originals = {fqn: swap_module_(model, fqn, m) for fqn, m in modules.items()}
    try:
        yield model
    finally:
        for fqn, m in originals.items():
            swap_module_(model, fqn, m)


def decode_speed(model: nn.Module, masks: Mapping[str, torch.Tensor], pattern: Pattern | str, ids: torch.Tensor,
                 new_tokens: int = 32, rounds: int = 3) -> dict[str, float]:
    """Decode tokens/s of ``model`` (pruned, weights masked in place) as it is, vs the same model with its masked
    Linear layers swapped for packed SparseLinear modules, in one interleaved run: {"dense_tok_s", "packed_tok_s",
    "speedup", "same_tokens" (fraction of greedy tokens that agree), "new_tokens", "rounds"}. Only the packed layers
    are built (no copy of the model); ``model`` is unchanged afterwards. GPT-2 Conv1D layers stay dense."""
    linears = {f: model.get_submodule(f) for f in masks if isinstance(model.get_submodule(f), nn.Linear)}
    packed = {f: SparseLinear.from_dense(m, masks[f], pattern) for f, m in linears.items()}
    load_before = load_average()
    rates, outs = decode_race({"dense": model, "packed": model}, ids, new_tokens, rounds,
                              contexts={"packed": lambda: swapped_in(model, packed)})
    same = float((outs["dense"] == outs["packed"]).float().mean())
    return {"dense_tok_s": rates["dense"], "packed_tok_s": rates["packed"],
            "speedup": rates["packed"] / rates["dense"], "same_tokens": same, "new_tokens": new_tokens,
            "rounds": rounds, "threads": torch.get_num_threads(), "cpus": os.cpu_count() or 1,
            "load_average": max(load_before, load_average())}


def load_average() -> float:
    """The 1-minute load average (runnable threads, ours included); 0.0 where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
