"""Quality and cost of a KV press on a model: long-text perplexity, needle retrieval, cache bytes, decode speed.

Every function takes ``kv``: a KVPress from an active ``compress(model, ...)`` block, or None for the full cache.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from sparsecraft.attention.presses import KVConfig
from sparsecraft.attention.wrap import KVPress, compress

CAPTURE = "sparsecraft_capture_queries"  # attention implementation that records queries (prefill)


def new_cache(model: nn.Module, kv: KVPress | None) -> Cache:
    return kv.cache() if kv is not None else DynamicCache(config=model.config)


def cache_bytes(cache: Cache) -> int:
    """Bytes of keys + values a cache holds (allocated slots, empty ones included)."""
    return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
               for l in cache.layers if getattr(l, "keys", None) is not None and l.keys.numel())


@torch.no_grad()
def continuation_nll(model: nn.Module, prefix: torch.Tensor, cont: torch.Tensor, kv: KVPress | None) -> float:
    """Summed negative log-likelihood of ``cont`` (m,) after ``prefix`` (n,): the prefix fills (and a press
    compresses) the cache, then the continuation is scored in one teacher-forced pass against that cache."""
    cache = new_cache(model, kv)
    first = model(prefix[None], cache=cache, use_cache=True).logits[0, -1:]  # predicts cont[0]
    rest = model(cont[None, :-1], cache=cache, use_cache=True).logits[0]    # predict cont[1:]
    logp = torch.log_softmax(torch.cat([first, rest]).float(), dim=-1)
    return float(-logp.gather(1, cont[:, None]).sum())


def long_perplexity(model: nn.Module, tokens: torch.Tensor, context: int, chunk: int, samples: int,
                    kv: KVPress | None) -> float:
    """Perplexity of ``chunk`` tokens after ``context`` tokens, at ``samples`` evenly spaced offsets of the text."""
    span = context + chunk
    if tokens.numel() < span:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than context + chunk = {span}; give a "
                         f"longer text or lower --context/--chunk")
    starts = torch.linspace(0, tokens.numel() - span, samples).long().tolist()
    nll = sum(continuation_nll(model, tokens[s:s + context], tokens[s + context:s + span], kv) for s in starts)
    return math.exp(nll / (samples * chunk))


# Passkey retrieval (Mohtashami & Jaggi, "Landmark Attention", 2023): a key sentence buried in a haystack that
# repeats one passage of real text, then the question. Running text as the haystack is not discriminative here:
# SmolLM2-135M with the full cache found 0 of 5 keys in 2048 tokens of running Shakespeare, 5 of 5 in a repeated one.
NEEDLE = "\nThe pass key is {0}. Remember it. {0} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
PASSAGE = 96       # tokens of text repeated to make the haystack
MIN_HAYSTACK = 16  # tokens of real text at the least around the needle


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def needle_room(tokenizer: Any) -> int:
    """The shortest prompt that holds a needle, the question and a minimal haystack, in tokens."""
    longest = max(_encode(tokenizer, NEEDLE.format(d * 5)).numel() for d in "0123456789")
    return longest + _encode(tokenizer, QUESTION).numel() + MIN_HAYSTACK + 2


def needle_prompt(passage: torch.Tensor, needle: torch.Tensor, question: torch.Tensor, context: int,
                  depth: float) -> torch.Tensor:
    """``passage`` (p,) repeated to fill ``context`` tokens around ``needle`` and before ``question``; the needle
    starts after ``round(depth * haystack)`` haystack tokens. -> (context,) ids."""
    hay = context - needle.numel() - question.numel()
    if hay < 0:
        raise ValueError(f"a prompt of {context} tokens cannot hold a needle of {needle.numel()} and a question of "
                         f"{question.numel()} tokens; raise the context")
    h = passage.repeat(-(-hay // passage.numel()))[:hay]
    at = round(depth * hay)
    return torch.cat([h[:at], needle, h[at:], question])


def needle_prompts(tokenizer: Any, tokens: torch.Tensor, context: int, n: int, seed: int = 0,
                   passage: int = PASSAGE) -> list[tuple[torch.Tensor, str]]:
    """``n`` passkey prompts of ``context`` tokens: a random 5-digit key in "The pass key is KEY. ..." at depths
    spread from 10% to 90% of a haystack repeating ``passage`` tokens drawn from ``tokens`` (a new passage and key
    per prompt), then the question. Returns (ids (context,), key)."""
    rng = random.Random(seed)
    question = _encode(tokenizer, QUESTION)
    out = []
    for i in range(n):
        answer = str(rng.randint(10000, 99999))
        needle = _encode(tokenizer, NEEDLE.format(answer))
        hay = context - needle.numel() - question.numel()
        if hay < MIN_HAYSTACK or tokens.numel() < passage:
            raise ValueError(f"a needle prompt of {context} tokens needs at least {needle_room(tokenizer)} tokens "
                             f"and a text of at least {passage} tokens; raise --seqlen or give a longer text")
        start = rng.randint(0, tokens.numel() - passage)
        depth = 0.1 + 0.8 * i / max(1, n - 1)
        out.append((needle_prompt(tokens[start:start + passage], needle, question, context, depth), answer))
    return out


@torch.no_grad()
def needle_accuracy(model: nn.Module, tokenizer: Any, prompts: list[tuple[torch.Tensor, str]],
                    kv: KVPress | None, new_tokens: int = 6) -> float:
    """Fraction of prompts whose greedy continuation contains the answer."""
    hits = 0
    for ids, answer in prompts:
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), cache=new_cache(model, kv),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        hits += answer in tokenizer.decode(out[0, ids.numel():])
    return hits / len(prompts)


@torch.no_grad()
def decode_speed(model: nn.Module, prefix: torch.Tensor, steps: int, kv: KVPress | None) -> dict[str, float]:
    """Prefill ``prefix`` then ``steps`` greedy decode steps: seconds of prefill, decode tokens/s, cache bytes."""
    cache = new_cache(model, kv)
    t0 = time.perf_counter()
    logits = model(prefix[None], cache=cache, use_cache=True).logits[:, -1]
    t1 = time.perf_counter()
    for _ in range(steps):
        logits = model(logits.argmax(-1, keepdim=True), cache=cache, use_cache=True).logits[:, -1]
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_tok_s": steps / (t2 - t1), "cache_bytes": cache_bytes(cache)}


def evaluate_press(model: nn.Module, tokenizer: Any, tokens: torch.Tensor, cfg: KVConfig | None, context: int,
                   chunk: int = 256, samples: int = 2, needles: int = 4, decode_steps: int = 16) -> dict[str, Any]:
    """All four measures for one setting (None = the full cache) -> a JSON-able dict."""
    ctx = compress(model, **asdict(cfg)) if cfg is not None else nullcontext()
    with ctx as kv:
        row: dict[str, Any] = {"method": cfg.method if cfg else "full", "budget": cfg.budget if cfg else 1.0,
                               "context": context}
        if samples:
            row["perplexity"] = long_perplexity(model, tokens, context, chunk, samples, kv)
        if needles:
            row["needle"] = needle_accuracy(model, tokenizer, needle_prompts(tokenizer, tokens, context, needles), kv)
        if decode_steps:
            row.update(decode_speed(model, tokens[:context], decode_steps, kv))
    return row


# ---- one prefill, many presses (benchmarks): the prompt pass does not depend on the press --------------------------
# A press acts after a layer's prefill attention, which always sees the whole prompt, so every press of one prompt
# starts from the same prefill: run it once with the full cache, keep each layer's post-RoPE queries, and press copies.

@dataclass
class Prefill:
    """One prompt's pass: logits of its last token (1, V), per layer keys / values (1, Hkv, n, D) and post-RoPE
    queries (1, Hq, n, D), the attention scaling, seconds taken (all of it, and inside the attention kernels)."""
    logits: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor]
    scaling: float
    seconds: float
    attention_seconds: float = 0.0


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor) -> Prefill:
    """Run ``ids`` (n,) through ``model`` (sdpa) with a full cache, recording every layer's queries."""
    queries: dict[int, torch.Tensor] = {}
    scaling: list[float] = []
    inside = [0.0]  # seconds in the attention kernel
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def capture(module, query, key, value, attention_mask, **kwargs):
        queries[module.layer_idx] = query
        scaling.append(kwargs.get("scaling") or query.shape[-1] ** -0.5)
        t = time.perf_counter()
        out = sdpa(module, query, key, value, attention_mask, **kwargs)
        inside[0] += time.perf_counter() - t
        return out

    AttentionInterface.register(CAPTURE, capture)  # re-registered per call: the closure holds this call's dict
    AttentionMaskInterface.register(CAPTURE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    before = model.config._attn_implementation
    if before != "sdpa":
        raise ValueError(f"prefill capture wraps 'sdpa' attention, the model uses {before!r}; call "
                         f"model.set_attn_implementation('sdpa') first")
    cache = DynamicCache(config=model.config)
    model.set_attn_implementation(CAPTURE)
    try:
        t0 = time.perf_counter()
        logits = model(ids[None], cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        seconds = time.perf_counter() - t0
    finally:
        model.set_attn_implementation(before)
    return Prefill(logits, [l.keys for l in cache.layers], [l.values for l in cache.layers],
                   [queries[i] for i in range(len(cache.layers))], scaling[0], seconds, inside[0])


def cache_after(model: nn.Module, pre: Prefill, kv: KVPress | None) -> Cache:
    """A fresh cache holding ``pre``'s prompt: full (kv None) or compressed by ``kv``'s press, exactly as if the
    prompt had run inside ``compress``. Decode from it inside the same ``compress`` block."""
    cache = new_cache(model, kv)
    for i, (k, v) in enumerate(zip(pre.keys, pre.values)):
        cache.layers[i].update(k, v)
        if kv is not None:
            cache.layers[i].press_(pre.queries[i], None, pre.scaling)
    return cache
