"""``SparseLinear``: a Linear layer whose weight is held in a kernel layout and run by the CPU kernels.

- ``SparseLinear.from_dense(linear, keep, pattern)`` packs a pruned ``nn.Linear``; ``to_dense()`` gives it back
  exactly (pruned weights are 0). ``SparseLinear.from_packed(packed, bias)`` builds one straight from an on-disk
  format (sparsecraft.formats), validated, without the dense weight; ``packed()`` goes back the same way.
- Decode (few tokens): the sparse kernel. Prefill (many tokens): where the kernel loses to dense, the weight is
  expanded to dense tiles on the fly and the dense GEMM runs (the rule is measured per layout and dtype, see
  ``DENSE_MIN_TOKENS``, ``SparseLinear.dense_from_tokens`` and docs/kernels.md; ``sparsecraft bench`` prints it per layer).
- ``sparsify_model_(model, masks, pattern)`` swaps every masked Linear. Reading and writing packed checkpoints is
  sparsecraft.checkpoint's job.
- ``choose_decode_paths_(model)``: per layer shape, times the kernel against dense ``F.linear`` on the expanded
  weight, cycling through the model's own layers of that shape as a decode step does; shapes where the kernel loses
  on this machine keep an expanded dense weight and run ``F.linear`` (never slower than dense, at the memory of a
  dense copy). Decisions are cached per machine (docs/kernels.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsecraft import formats
from sparsecraft.io import atomic_write_text
from sparsecraft.kernels import dense_tiles_linear, load_kernels, make_layout, sparse_linear
from sparsecraft.kernels.layout import BitmaskLayout, CsrLayout, Layout, check_layout, layout_keep, layout_to_dense
from sparsecraft.kernels.measure import Cycle, time_interleaved
from sparsecraft.modules.swap import swap_module_
from sparsecraft.patterns import Pattern, parse_pattern, satisfies

# From this many tokens per call on, run fp32 dense GEMMs on weight tiles expanded on the fly; below it, the sparse
# kernel. Keyed by (layout kind, weight dtype). Measured on the 2-core AVX2 EPYC, same run (bench/bench_kernels.py
# --prefill, 4096x4096, docs/kernels.md): fp32 bitmask kernels beat dense up to 24-32 tokens and the expanded tiles
# match or beat dense from there; bf16 bitmask kernels beat torch's bf16 GEMM (no AVX512-BF16 here) at every size,
# the fp32 tiles beat them from 32-64 tokens; CSR kernels at 80% lose to dense from about 512 tokens.
DENSE_MIN_TOKENS: dict[tuple[str, torch.dtype], int] = {
    ("bitmask", torch.float32): 32,
    ("bitmask", torch.bfloat16): 64,
    ("csr", torch.float32): 256,
    ("csr", torch.bfloat16): 256,
}
DEFAULT_DENSE_MIN_TOKENS = 32  # other dtypes (their kernel path is the plain-torch reference)
# From this sparsity on, a CSR layer runs its kernel at any length: it reads the weight once per call and does a
# tenth of the dense work (measured 1.6x of dense at 2048 tokens at 90%).
CSR_KERNEL_ONLY_SPARSITY = 0.895  # 90%, less a rounding margin: 90% of an odd count keeps one weight more


def dense_min_tokens_for(kind: str, dtype: torch.dtype, sparsity: float) -> int | None:
    """The measured prefill threshold of a ``kind`` layout ("bitmask" | "csr") of ``dtype`` weights at
    ``sparsity``; None = the kernel at any token count."""
    if kind == "csr" and sparsity >= CSR_KERNEL_ONLY_SPARSITY:
        return None
    return DENSE_MIN_TOKENS.get((kind, dtype), DEFAULT_DENSE_MIN_TOKENS)


def use_dense_path(tokens: int, kind: str, dtype: torch.dtype, sparsity: float = 0.0,
                   dense_min_tokens: int | None = None) -> bool:
    """The prefill rule: True when a call with ``tokens`` rows should run dense GEMMs on expanded tiles.
    ``dense_min_tokens`` overrides the measured rule."""
    threshold = dense_min_tokens or dense_min_tokens_for(kind, dtype, sparsity)
    return threshold is not None and tokens >= threshold


class SparseLinear(nn.Module):
    """y = x @ W.T + b with W held in a kernel layout (bitmask or CSR) as buffers."""

    def __init__(self, layout: Layout, bias: torch.Tensor | None, pattern: Pattern, use_kernel: bool = True):
        super().__init__()
        self.in_features, self.out_features = layout.shape[1], layout.shape[0]
        self.pattern = pattern
        self.use_kernel = use_kernel
        self.dense_min_tokens: int | None = None  # None = the measured rule of use_dense_path
        self.kind = "csr" if isinstance(layout, CsrLayout) else "bitmask"
        self.skip_zero_bytes = isinstance(layout, BitmaskLayout) and layout.skip_zero_bytes
        if isinstance(layout, CsrLayout):
            self.register_buffer("col", layout.col)
        else:
            self.register_buffer("mask", layout.mask)
        self.register_buffer("values", layout.values)
        self.register_buffer("row_ptr", layout.row_ptr)
        self.sparsity = 1.0 - int(layout.row_ptr[-1]) / max(1, self.in_features * self.out_features)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._layout: Layout | None = None
        # The expanded dense weight (out, in) when choose_decode_paths_ measured the kernel slower than dense for
        # this layer's shape on this machine; then every call runs F.linear on it. Not saved in the state dict.
        self.decode_weight: torch.Tensor | None = None
        check_layout(self.layout, "SparseLinear")
        # A state dict loaded later (load_state_dict) may replace the buffers: validate before any kernel reads them.
        self.register_load_state_dict_post_hook(_check_after_load)

    @staticmethod
    def from_dense(
        linear: nn.Linear, keep: torch.Tensor, pattern: Pattern | str = "unstructured", layout: str = "auto"
    ) -> "SparseLinear":
        """Pack a Linear with its keep-mask (out, in) bool; weights where keep is False are dropped."""
        pattern = parse_pattern(pattern)
        weight = linear.weight.detach().cpu()
        if keep.shape != weight.shape or keep.dtype != torch.bool:
            raise ValueError(
                f"keep must be a torch.bool mask shaped like the weight {tuple(weight.shape)}, got "
                f"{keep.dtype} {tuple(keep.shape)}"
            )
        if not satisfies(keep, pattern):
            raise ValueError(f"keep mask does not satisfy pattern {pattern}; build it with topk_mask(..., '{pattern}')")
        dense = torch.where(keep, weight, torch.zeros((), dtype=weight.dtype))
        bias = None if linear.bias is None else linear.bias.detach().cpu()
        return SparseLinear(make_layout(dense, keep.cpu(), layout), bias, pattern)

    @staticmethod
    def from_packed(packed: formats.AnyPacked, bias: torch.Tensor | None = None,
                    layout: str = "auto") -> "SparseLinear":
        """Build from a validated on-disk format (``formats.from_tensors``): its kernel layout, no dense weight."""
        return SparseLinear(packed.to_layout(layout), bias, formats.pattern_of(packed))

    @property
    def layout(self) -> Layout:
        # A view of the buffers, rebuilt only when .to() / load_state_dict replaced them (saves ~3 us per call).
        values = self.values
        if self._layout is None or self._layout.values is not values:
            if self.kind == "csr":
                self._layout = CsrLayout(self.col, values, self.row_ptr, self.in_features)
            else:
                self._layout = BitmaskLayout(self.mask, values, self.row_ptr, self.in_features, self.skip_zero_bytes)
        return self._layout

    def keep(self) -> torch.Tensor:
        return layout_keep(self.layout)

    def dense_weight(self) -> torch.Tensor:
        """The exact dense weight (out, in)."""
        return layout_to_dense(self.layout)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with exactly this weight (zeros where pruned) and bias."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def packed(self) -> formats.AnyPacked:
        """The on-disk format (sparsecraft.formats) of the weight, straight from the layout."""
        return formats.from_layout(self.layout, self.pattern)

    @property
    def nbytes(self) -> int:
        """Bytes of the in-memory layout (weight only)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out). Kept lean: at decode a SmolLM2 layer takes tens of microseconds.
        if self.decode_weight is not None:
            return torch.nn.functional.linear(x, self.decode_weight, self.bias)
        if use_dense_path(x.numel() // self.in_features, self.kind, self.values.dtype, self.sparsity,
                          self.dense_min_tokens):
            y = dense_tiles_linear(self.layout, x.reshape(-1, self.in_features), self.bias, self.use_kernel)
            return y.reshape(*x.shape[:-1], self.out_features)
        return sparse_linear(self.layout, x, self.bias, self.use_kernel)

    def dense_from_tokens(self) -> int | None:
        """The smallest tokens-per-call that runs dense tiles instead of the kernel (None: never)."""
        return self.dense_min_tokens or dense_min_tokens_for(self.kind, self.values.dtype, self.sparsity)

    def extra_repr(self) -> str:
        start = self.dense_from_tokens()
        prefill = "kernel at any length" if start is None else f"dense tiles from {start} tokens"
        decode = ", decode=dense (kernel measured slower)" if self.decode_weight is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
            f"layout={self.kind}, bias={self.bias is not None}, prefill={prefill}{decode}"
        )


def _check_after_load(module: nn.Module, incompatible: Any) -> None:
    module._layout = None
    check_layout(module.layout, "SparseLinear (loaded state dict)")


def sparsify_model_(model: nn.Module, masks: dict[str, torch.Tensor], pattern: Pattern | str) -> dict:
    """Replace every ``nn.Linear`` named in ``masks`` (fqn -> keep) by a SparseLinear, in place.

    Returns a summary: replaced fqns, the layout chosen per layer, and dense vs packed weight bytes.
    """
    pattern = parse_pattern(pattern)
    linears = {fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(masks) - linears)
    if missing:
        raise ValueError(
            f"masks name {len(missing)} modules that are not nn.Linear in this model, e.g. {missing[:3]}; "
            f"valid fqns look like {sorted(linears)[:3]}"
        )
    summary: dict = {"replaced": [], "layouts": {}, "dense_bytes": 0, "sparse_bytes": 0}
    for fqn in sorted(masks):
        linear = model.get_submodule(fqn)
        sparse = SparseLinear.from_dense(linear, masks[fqn], pattern)
        swap_module_(model, fqn, sparse)
        summary["replaced"].append(fqn)
        summary["layouts"][fqn] = sparse.kind
        summary["dense_bytes"] += linear.weight.numel() * linear.weight.element_size()
        summary["sparse_bytes"] += sparse.nbytes
    return summary


DECODE_PATH_CACHE = Path.home() / ".cache" / "sparsecraft" / "decode_paths.json"


def _machine() -> str:
    """What a decision holds for: the CPU model name (Linux /proc/cpuinfo), the kernel build (its name carries the ISA
    and a hash of the source, so a changed kernel is measured again) and torch's thread count."""
    try:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "unknown CPU")
    except OSError:
        name = "unknown CPU"
    ext = load_kernels()
    return f"{name}|{ext.__name__ if ext is not None else 'ref'}|threads={torch.get_num_threads()}"


def _shape_key(m: SparseLinear) -> str:
    # Sparsity to the nearest 5%: layers of one shape pruned to one plan share a decision.
    dtype = str(m.values.dtype).removeprefix("torch.")
    return f"{m.out_features}x{m.in_features}|{dtype}|{m.kind}|{round(m.sparsity * 20) / 20:.2f}"


def _time_group(layers: list[SparseLinear], rounds: int) -> dict[str, float]:
    """Median seconds of one batch-1 call, kernel vs dense F.linear on the expanded weights, cycling through the
    group's layers (each weight read once per cycle, as in a decode step), interleaved."""
    x = torch.randn(1, layers[0].in_features).to(layers[0].values.dtype)
    dense = [m.dense_weight() for m in layers]
    fns = {"kernel": Cycle(lambda m: sparse_linear(m.layout, x, None, m.use_kernel), layers),
           "dense": Cycle(lambda w: torch.nn.functional.linear(x, w), dense)}
    with torch.inference_mode():
        return time_interleaved(fns, rounds, calls=max(3, len(layers)))


def choose_decode_paths_(model: nn.Module, rounds: int = 7, cache: Path | None = DECODE_PATH_CACHE,
                         remeasure: bool = False) -> dict[str, str]:
    """For each shape of SparseLinear in ``model`` (out x in, dtype, layout, sparsity to 5%), measure whether the
    kernel or dense ``F.linear`` on the expanded weight is faster at batch 1 on this machine (once per machine and
    shape, cached in the JSON file ``cache``; None = no cache), and give the layers of the shapes where dense wins
    their expanded weight (``decode_weight``), so the packed model is never slower than dense on a layer. In place;
    returns fqn -> "kernel" | "dense"."""
    groups: dict[str, list[tuple[str, SparseLinear]]] = {}
    for fqn, m in model.named_modules():
        if isinstance(m, SparseLinear):
            groups.setdefault(_shape_key(m), []).append((fqn, m))
    machine = _machine()
    known = {} if cache is None or remeasure else _read_decisions(cache)
    chosen: dict[str, str] = {}
    for key, members in groups.items():
        full = f"{machine}|{key}"
        if full not in known:
            t = _time_group([m for _, m in members], rounds)
            known[full] = "dense" if t["dense"] < t["kernel"] else "kernel"
        for fqn, m in members:
            m.decode_weight = m.dense_weight() if known[full] == "dense" else None
            chosen[fqn] = known[full]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(known, indent=1, sort_keys=True))
    return chosen


def _read_decisions(cache: Path) -> dict[str, str]:
    """The cached decisions; a missing, unreadable or malformed file counts as empty (every shape is measured again
    and the file rewritten)."""
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {k: v for k, v in known.items() if isinstance(k, str) and v in ("dense", "kernel")}
