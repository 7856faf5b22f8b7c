"""KV-cache presses and block-sparse prefill (sparsecraft.attention) on a tiny grouped-query LLaMA.

References are plain torch: softmax attention written out, selections recomputed from the queries and keys with
loops, and a full (uncompressed) cache whose dropped tokens are hidden per layer and head by an explicit mask.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from sparsecraft.attention import KVConfig, block_sparse, compress
from sparsecraft.attention.blocksparse import (BlockSparseConfig, block_mask, block_scores, prefill_attention,
                                               select_blocks)
from sparsecraft.attention.presses import press
from sparsecraft.attention.select import merge_adjacent

METHODS = ["streaming", "h2o", "snapkv", "merge"]
HQ, HKV, D = 4, 2, 8  # query heads, key/value heads (2 query heads per KV head), head dim


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=HQ * D, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=512,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def prompt(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor, cache=None, new: int = 6, **kw):
    out = model.generate(ids, attention_mask=kw.pop("attention_mask", torch.ones_like(ids)), cache=cache,
                         max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True,
                         pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits)


def prompt_keep(cache, n: int) -> list[torch.Tensor]:
    """Per layer, which of the n prompt tokens each KV head kept -> (B, Hkv, n) bool, from the slots' positions."""
    out = []
    for layer in cache.layers:
        pos = layer.position
        ok = (pos >= 0) & (pos < n)
        keep = torch.zeros(*pos.shape[:2], n + 1, dtype=torch.bool)
        out.append(keep.scatter_(-1, torch.where(ok, pos, n), True)[..., :n])
    return out


# ---- reference: the full cache, dropped prompt tokens hidden per layer and head --------------------------------

def reference_attention(keep: list[torch.Tensor], n: int):
    """Plain softmax attention over the FULL cache; queries after the prompt see only its kept tokens."""

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, H, q, _ = query.shape
        N = key.shape[2]
        g = H // key.shape[1]
        k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        logits = query @ k.transpose(-1, -2) * scaling  # (B, H, q, N)
        q_pos = torch.arange(N - q, N)[:, None]
        allowed = (torch.arange(N)[None] <= q_pos).expand(B, H, q, N).clone()  # causal
        if N > n:  # decoding: the prompt part of each head is its kept set
            allowed[..., :n] &= keep[module.layer_idx].repeat_interleave(g, 1)[:, :, None, :]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        return (probs @ v).transpose(1, 2).contiguous(), None

    return attention


def run_reference(model, ids: torch.Tensor, keep: list[torch.Tensor], new: int) -> torch.Tensor:
    name = "test_reference_masked"
    AttentionInterface.register(name, reference_attention(keep, ids.shape[1]))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(name)
    try:
        return greedy(model, ids, DynamicCache(config=model.config), new)
    finally:
        model.set_attn_implementation("sdpa")


# ---- presses in generate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_full_budget_equals_full_cache(model, method) -> None:
    ids = prompt(40)
    seq, logits = greedy(model, ids)
    with compress(model, method=method, budget=1.0) as kv:
        cache = kv.cache()
        seq_c, logits_c = greedy(model, ids, cache)
    assert torch.equal(logits_c, logits) and torch.equal(seq_c, seq)
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget,count", [(0.25, 10), (0.5, 20), (13, 13)])
def test_each_press_keeps_exactly_its_budget(model, method, budget, count) -> None:
    ids = prompt(40)
    with compress(model, method=method, budget=budget, sinks=2, window=4) as kv:
        cache = kv.cache()
        model(ids, cache=cache, use_cache=True)
    for layer in cache.layers:
        assert layer.keys.shape == (1, HKV, count, D)
        assert torch.equal(layer.kept_per_head, torch.full((1, HKV), count))
        assert layer.seen == 40 and cache.get_seq_length() == 40


def test_pyramid_layers_split_the_budget(model) -> None:
    with compress(model, method="snapkv", budget=10, layers="pyramid", sinks=2, window=4) as kv:
        cache = kv.cache()
        model(prompt(40), cache=cache, use_cache=True)
    assert [int(k.max()) for k in cache.kept()] == [15, 5]  # 1.5x and 0.5x of 10, the mean kept exact


def test_streaming_keeps_sinks_and_recent_window(model) -> None:
    ids = prompt(40)
    full = DynamicCache(config=model.config)
    model(ids, cache=full, use_cache=True)
    with compress(model, method="streaming", budget=10, sinks=3) as kv:
        cache = kv.cache()
        model(ids, cache=cache, use_cache=True)
    golden = torch.tensor([0, 1, 2, 33, 34, 35, 36, 37, 38, 39])  # 3 sinks + the last 7 tokens
    for layer, ref in zip(cache.layers, full.layers):
        assert torch.equal(layer.position, golden.expand(1, HKV, 10))
        assert torch.equal(layer.keys, ref.keys[:, :, golden]) and torch.equal(layer.values, ref.values[:, :, golden])


@pytest.mark.parametrize("method", ["streaming", "h2o", "snapkv"])
def test_decoding_attends_exactly_the_kept_tokens(model, method) -> None:
    """Compressed generate == full cache with the dropped tokens masked, per layer and KV head (GQA)."""
    ids = prompt(48)
    with compress(model, method=method, budget=0.25, sinks=1, window=3) as kv:
        cache = kv.cache()
        seq, logits = greedy(model, ids, cache, new=8)
    keep = prompt_keep(cache, 48)
    assert all(int(k.sum(-1).min()) == 12 == int(k.sum(-1).max()) for k in keep)
    if method == "snapkv":  # per-head selections really differ between heads somewhere (h2o: near-uniform
        # attention of a random model makes every head favour the earliest tokens alike)
        assert any(not torch.equal(k[:, 0], k[:, 1]) for k in keep)
    seq_ref, logits_ref = run_reference(model, ids, keep, new=8)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(seq, seq_ref)
    _, dense = greedy(model, ids, new=8)
    assert not torch.allclose(logits, dense, atol=1e-4)  # compression changed something: the test can fail


# ---- selection rules against plain-torch references -----------------------------------------------------------

def qkv(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, HQ, n, D, generator=g), torch.randn(1, HKV, n, D, generator=g),
            torch.randn(1, HKV, n, D, generator=g))


def probs_loop(q: torch.Tensor, k: torch.Tensor, h: int, i: int, scaling: float) -> torch.Tensor:
    """Attention of query i of query head h over keys 0..i (causal) -> (n,), written out one row at a time."""
    n = k.shape[2]
    logits = torch.full((n,), float("-inf"))
    for j in range(i + 1):
        logits[j] = (q[0, h, i] * k[0, h // (HQ // HKV), j]).sum() * scaling
    return torch.softmax(logits, 0)


def topk_loop(score: torch.Tensor, count: int, forced: set[int]) -> set[int]:
    """Forced tokens first, then the highest scores, ties to the earlier token."""
    rest = sorted((i for i in range(score.numel()) if i not in forced), key=lambda i: (-float(score[i]), i))
    return set(forced) | set(rest[: count - len(forced)])


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_selection_matches_reference(method) -> None:
    n, count, sinks, window, pool = 24, 9, 2, 4, 3
    q, k, v = qkv(n)
    scaling = D ** -0.5
    cfg = KVConfig(method=method, budget=count, sinks=sinks, window=window, pool=pool)
    kept = press(cfg, q, k, v, None, scaling, count)
    rows = range(n - window, n) if method == "snapkv" else range(n)
    forced = set(range(sinks)) | set(range(n - window, n))
    for hk in range(HKV):
        per_q = []
        for h in range(hk * 2, hk * 2 + 2):
            s = sum(probs_loop(q, k, h, i, scaling) for i in rows)
            if method == "snapkv":  # average over the pool-wide neighbourhood that exists
                s = torch.stack([s[max(0, j - 1): j + 2].mean() for j in range(n)])
            per_q.append(s)
        score = (per_q[0] + per_q[1]) / 2
        want = sorted(topk_loop(score, count, forced))
        assert kept.position[0, hk].tolist() == want
        assert torch.equal(kept.keys[0, hk], k[0, hk, want]) and torch.equal(kept.values[0, hk], v[0, hk, want])


def test_adaptive_heads_share_the_layer_budget() -> None:
    q, k, v = qkv(32, seed=3)
    kept = press(KVConfig(method="snapkv", budget=8, heads="adaptive", sinks=1, window=2), q, k, v, None, 0.35, 8)
    per_head = (kept.position >= 0).sum(-1)
    assert int(per_head.sum()) == 8 * HKV and int(per_head.min()) >= 3  # forced 1 + 2 in every head


def test_merge_golden_case() -> None:
    """Six keys in three similar pairs, budget 3: each pair becomes one slot, its weighted mean."""
    keys = torch.tensor([[1, 0], [1, .1], [0, 1], [.1, 1], [-1, 0], [-1, .1]]).view(1, 1, 6, 2)
    values = torch.arange(12.0).view(1, 1, 6, 2)
    w = torch.tensor([1., 3., 2., 2., 0., 4.]).view(1, 1, 6)
    m = merge_adjacent(keys, values, w, 3, torch.zeros(1, 6, dtype=torch.bool))
    ww = (w + 1e-6)[0, 0]
    for slot, (a, b) in enumerate([(0, 1), (2, 3), (4, 5)]):
        for name, x in (("keys", keys), ("values", values)):
            want = (ww[a] * x[0, 0, a] + ww[b] * x[0, 0, b]) / (ww[a] + ww[b])
            torch.testing.assert_close(m[name][0, 0, slot], want)
    assert m["position"][0, 0].tolist() == [1, 3, 5]  # a slot sits at its latest member
    torch.testing.assert_close(m["log_size"][0, 0], torch.full((3,), math.log(2)))
    # forced tokens stay alone: token 1 forced cuts both of its sides
    m = merge_adjacent(keys, values, w, 4, torch.tensor([[False, True, False, False, False, False]]))
    assert m["position"][0, 0].tolist() == [0, 1, 3, 5]
    torch.testing.assert_close(m["log_size"][0, 0], torch.tensor([0., 0., math.log(2), math.log(2)]))


def test_merge_in_the_model_keeps_sinks_and_window_unmerged(model) -> None:
    ids = prompt(40)
    full = DynamicCache(config=model.config)
    model(ids, cache=full, use_cache=True)
    with compress(model, method="merge", budget=12, sinks=2, window=4) as kv:
        cache = kv.cache()
        seq, _ = greedy(model, ids, cache, new=4)
    for layer, ref in zip(cache.layers, full.layers):
        pos, size = layer.position[..., :12], layer.log_size[..., :12].exp()
        forced = [0, 1, 36, 37, 38, 39]
        for j in (0, 1, 8, 9, 10, 11):  # the forced tokens are their own slots, keys unchanged
            assert pos[0, :, j].tolist() == [forced[(0, 1, 8, 9, 10, 11).index(j)]] * HKV
            torch.testing.assert_close(layer.keys[0, :, j], ref.keys[0, :, pos[0, 0, j]])
        torch.testing.assert_close(size.sum(-1), torch.full((1, HKV), 40.0))  # every token is in one slot
        assert torch.all(layer.log_size[..., 12:] == 0)  # decoded tokens are single
    assert seq.shape == (1, 44)


# ---- batches, beams, padding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_generate_with_batch_and_beams(model, method) -> None:
    ids = prompt(32, batch=2)
    with compress(model, method=method, budget=0.5, sinks=2, window=4) as kv:
        batch, _ = greedy(model, ids, kv.cache())
        beams = model.generate(ids, attention_mask=torch.ones_like(ids), cache=kv.cache(), num_beams=2,
                               max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        single, _ = greedy(model, ids[1:], kv.cache())
    assert batch.shape == (2, 38) and beams.shape == (2, 36)
    assert torch.equal(batch[1:], single)  # a row of a batch decodes as it would alone


@pytest.mark.parametrize("method", ["streaming", "snapkv", "h2o"])
def test_left_padding_is_never_attended(model, method) -> None:
    """A left-padded row decodes like the same row unpadded with the same press (padding never kept over text)."""
    short = prompt(28, seed=5)
    ids = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 28, dtype=torch.long)], dim=1)
    with compress(model, method=method, budget=14, sinks=2, window=4) as kv:
        seq_pad, logits_pad = greedy(model, ids, kv.cache(), attention_mask=mask)
        seq, logits = greedy(model, short, kv.cache(), attention_mask=torch.ones_like(short))
    torch.testing.assert_close(logits_pad, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(seq_pad[:, 4:], seq)


def test_merge_keeps_padding_in_its_own_hidden_slot(model) -> None:
    short = prompt(28, seed=5)
    ids = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 28, dtype=torch.long)], dim=1)
    with compress(model, method="merge", budget=10, sinks=2, window=4) as kv:
        cache = kv.cache()
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
    for layer in cache.layers:
        assert layer.keys.shape[2] == 10
        pos, size = layer.position[0], layer.log_size[0].exp()
        assert pos[:, 0].tolist() == [3] * HKV and size[:, 0].tolist() == [4.0] * HKV  # the 4 pads, one slot
        assert pos[:, 1:3].tolist() == [[4, 5]] * HKV and pos[:, 6:].tolist() == [[28, 29, 30, 31]] * HKV
        torch.testing.assert_close(size[:, 1:].sum(-1), torch.full((HKV,), 28.0))  # text never mixes with pads
        hidden = layer.slot_mask(mask.bool()[:, None, None, :], 1, 2, torch.float32)  # as the next token sees it
        assert torch.all(hidden[..., 0] == torch.finfo(torch.float32).min)
        # every text slot is visible, with its merge bias log(members) on the logit, the same for a KV head's queries
        torch.testing.assert_close(hidden[0, :, 0, 1:], layer.log_size[0, :, 1:].repeat_interleave(2, 0))


def test_bad_settings_are_one_line_errors(model) -> None:
    for kwargs, words in [({"method": "nope"}, "unknown KV method"), ({"budget": 0}, "budget must be > 0"),
                          ({"budget": 2.5}, "must be whole"), ({"pool": 4}, "odd"),
                          ({"method": "streaming", "heads": "adaptive"}, "heads='uniform'")]:
        with pytest.raises(ValueError, match=words):
            with compress(model, **kwargs):
                pass
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="smaller than the forced"):
        merge_adjacent(*qkv(8)[1:], torch.ones(1, HKV, 8), 2, torch.ones(1, 8, dtype=torch.bool))


# ---- block-sparse prefill ----------------------------------------------------------------------------------------

def dense_causal(q, k, v, scaling, allowed=None):
    n = q.shape[2]
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal if allowed is None else allowed & causal
    logits = (q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, -1) @ v


@pytest.mark.parametrize("n", [64, 70])  # whole blocks, and a short last block
def test_block_sparse_full_density_is_dense(n) -> None:
    q, k, v = qkv(n, seed=7)
    out = prefill_attention(q, k, v, BlockSparseConfig(block=8, density=1.0, min_tokens=0), 0.3)
    torch.testing.assert_close(out, dense_causal(q, k, v, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,density", [(64, 0.25), (77, 0.3), (96, 0.5)])
def test_block_sparse_equals_masked_reference(n, density) -> None:
    q, k, v = qkv(n, seed=n)
    cfg, b, scaling = BlockSparseConfig(block=8, density=density, min_tokens=0), 8, 0.3
    out = prefill_attention(q, k, v, cfg, scaling)
    logits = block_scores(q, k.repeat_interleave(2, 1), b, scaling)
    nb = logits.shape[-1]
    index, valid = select_blocks(logits, cfg.kept_blocks(nb))
    blocks = block_mask(index, valid, nb)  # (1, HQ, nb, nb)
    assert torch.all(blocks[..., 0]) and torch.all(blocks.diagonal(dim1=-2, dim2=-1))  # sink + diagonal
    K = cfg.kept_blocks(nb)
    assert torch.equal(blocks.sum(-1), torch.arange(1, nb + 1).clamp_max(K).expand(1, HQ, nb))
    tokens = blocks.repeat_interleave(b, -1).repeat_interleave(b, -2)[..., :n, :n]
    ref = dense_causal(q, k, v, scaling, tokens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, dense_causal(q, k, v, scaling), atol=1e-3)  # something was dropped


def test_block_selection_golden() -> None:
    """Hand-set pooled logits: each row keeps block 0, its diagonal, then its best earlier block."""
    logits = torch.tensor([[0., 9, 9, 9, 9], [1, 2, 9, 9, 9], [5, 1, 3, 9, 9], [1, 2, 7, 0, 9],
                           [3, 8, 1, 8, 2]]).view(1, 1, 5, 5)
    logits = logits.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    index, valid = select_blocks(logits, 3)
    mask = block_mask(index, valid, 5)[0, 0].int().tolist()
    # rows 0-2 have at most 3 causal blocks: all kept; row 4: a tie (8, 8) goes to the earlier block
    assert mask == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 0, 0, 1]]


def test_block_sparse_in_the_model(model) -> None:
    ids = prompt(96)
    dense = model(ids).logits
    with block_sparse(model, block=16, density=0.5, min_tokens=200):  # too short: dense fallback, bit-exact
        assert torch.equal(model(ids).logits, dense)
    with block_sparse(model, block=16, density=1.0, min_tokens=64):
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-4, atol=1e-4)
    with block_sparse(model, block=16, density=0.3, min_tokens=64):
        sparse = model(ids).logits
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
    assert not torch.allclose(sparse, dense, atol=1e-4) and seq.shape == (1, 99)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="density"):
        with block_sparse(model, density=0.0):
            pass


# ---- evaluation helpers and the CLI ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    from helpers_cli import make_checkpoint, make_text

    root = tmp_path_factory.mktemp("kv")
    return {"model": make_checkpoint(root / "tiny"), "text": make_text(root / "text.txt", repeats=10)}


def test_needle_prompt_golden() -> None:
    from sparsecraft.attention.evaluate import needle_prompt

    t = lambda s: torch.tensor([ord(c) for c in s])
    text = lambda ids: "".join(chr(i) for i in ids.tolist())
    # haystack 12 - 1 - 2 = 9 tokens "abcdabcda"; the needle after round(0.5 * 9) = 4 of them
    assert text(needle_prompt(t("abcd"), t("N"), t("?Q"), 12, 0.5)) == "abcdNabcda?Q"
    assert text(needle_prompt(t("abcd"), t("N"), t("?Q"), 12, 0.1)) == "aNbcdabcda?Q"  # round(0.9) = 1
    assert text(needle_prompt(t("xy"), t("NN"), t("Q"), 5, 1.0)) == "xyNNQ"
    with pytest.raises(ValueError, match="cannot hold a needle"):
        needle_prompt(t("ab"), t("NNN"), t("QQ"), 4, 0.5)


def test_needle_prompts_and_full_budget_retrieval(model) -> None:
    from helpers_cli import TEXT, char_tokenizer
    from sparsecraft.attention.evaluate import PASSAGE, needle_accuracy, needle_prompts, needle_room

    tok = char_tokenizer(TEXT + "0123456789?WTR")
    chars = lambda ids: "".join(tok.convert_ids_to_tokens(ids.tolist()))
    text = TEXT * 3
    tokens = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    prompts = needle_prompts(tok, tokens, 400, 3)
    for ids, answer in prompts:
        s = chars(ids)
        assert ids.numel() == 400 and s.endswith("\nWhat is the pass key? The pass key is")
        assert f"\nThe pass key is {answer}. Remember it. {answer} is the pass key.\n" in s and len(answer) == 5
        hay = s.replace(f"\nThe pass key is {answer}. Remember it. {answer} is the pass key.\n", "")
        hay = hay[:-len("\nWhat is the pass key? The pass key is")]
        passage = hay[:PASSAGE]
        assert passage in text and hay == (passage * 5)[:len(hay)]  # one passage of the text, repeated
    needle_len = len("\nThe pass key is 12345. Remember it. 12345 is the pass key.\n")
    hay_len = 400 - needle_len - len("\nWhat is the pass key? The pass key is")
    depths = [chars(ids).index("\nThe pass") for ids, _ in prompts]
    assert depths == [round(d * hay_len) for d in (0.1, 0.5, 0.9)]  # 10%, 50%, 90% of the haystack
    with pytest.raises(ValueError, match=f"at least {needle_room(tok)} tokens"):
        needle_prompts(tok, tokens, needle_room(tok) - 3, 1)
    full = needle_accuracy(model, tok, prompts, None)
    with compress(model, method="snapkv", budget=1.0) as kv:
        assert needle_accuracy(model, tok, prompts, kv) == full


def kv_main(argv: list[str], capsys) -> tuple[int, str, str]:
    from sparsecraft.cli import main

    code = main(argv + ["--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def row(out: str, name: str) -> list[str]:
    """The columns after the row's name: perplexity, needle, cache MiB, prefill s, decode tok/s."""
    return next(line for line in out.splitlines() if line.startswith(name))[len(name):].split()


def test_cli_kv_eval(tiny_run, capsys) -> None:
    from sparsecraft import data
    from sparsecraft.attention.evaluate import long_perplexity
    from sparsecraft.models import load_model

    base = ["kv", "eval", str(tiny_run["model"]), "--text", str(tiny_run["text"]), "--seqlen", "40", "--chunk",
            "8", "--decode-steps", "4"]
    code, out, _ = kv_main(base + ["--method", "h2o", "--budget", "1.0"], capsys)
    assert code == 0 and "needle retrieval skipped" in out  # 40 tokens cannot hold a needle prompt
    m, tok = load_model(str(tiny_run["model"]))
    tokens = data.tokenize(tok, data.read_text(tiny_run["text"]))
    ppl = long_perplexity(m, tokens, 40, 8, 2, None)
    full, press_ = row(out, "full"), row(out, "h2o 1")
    assert float(full[0]) == pytest.approx(ppl, abs=1e-3) and press_[:3] == full[:3]  # budget 1 == full cache
    code, out, _ = kv_main(base + ["--method", "streaming", "--budget", "10", "--sinks", "2"], capsys)
    full, press_ = row(out, "full"), row(out, "streaming 10")
    # 2 layers x K and V x 2 heads x 8 dims x 4 bytes per token: 40 + 4 tokens full, 10 + 4 compressed
    assert float(full[2]) == pytest.approx(256 * 44 / 2 ** 20, abs=1e-3)
    assert float(press_[2]) == pytest.approx(256 * 14 / 2 ** 20, abs=1e-3) and "cache x0.318" in out


@pytest.mark.parametrize("flags,words", [
    (["--budget", "0"], "budget must be > 0"),
    (["--method", "snapkv", "--heads", "adaptive", "--budget", "1.5"], "must be whole"),
    (["--seqlen", "60"], "longer than the model's context (64 tokens)"),
    (["--chunk", "40"], "must be shorter than seqlen"),
    (["--text", "/nonexistent.txt"], "does not exist"),
])
def test_cli_kv_bad_input_is_one_line(tiny_run, capsys, flags, words) -> None:
    code, out, err = kv_main(["kv", "eval", str(tiny_run["model"]), "--text", str(tiny_run["text"]), "--seqlen",
                              "40", *flags], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("method", METHODS)
def test_one_prefill_many_presses_equals_pressing_in_the_model(model, method) -> None:
    from sparsecraft.attention.evaluate import cache_after, prefill

    ids = prompt(40)[0]
    pre = prefill(model, ids)
    assert model.config._attn_implementation == "sdpa" and 0 < pre.attention_seconds < pre.seconds
    torch.testing.assert_close(pre.logits, model(ids[None]).logits[:, -1])
    nxt = torch.tensor([[5, 7, 9]])
    with compress(model, method=method, budget=0.25, sinks=2, window=4) as kv:
        ref = kv.cache()
        model(ids[None], cache=ref, use_cache=True)
        ref_logits = model(nxt, cache=ref, use_cache=True).logits
        built = cache_after(model, pre, kv)
        built_logits = model(nxt, cache=built, use_cache=True).logits
    for a, b in zip(built.layers, ref.layers):
        assert torch.equal(a.position, b.position) and a.seen == b.seen == 43
        torch.testing.assert_close(a.keys, b.keys) and torch.testing.assert_close(a.values, b.values)
    torch.testing.assert_close(built_logits, ref_logits)
    full = cache_after(model, pre, None)
    whole = model(torch.cat([ids[None], nxt], 1)).logits[:, 40:]
    torch.testing.assert_close(model(nxt, cache=full, use_cache=True).logits, whole)
