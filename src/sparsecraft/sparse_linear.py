"""``SparseLinear``: a Linear layer whose weight is stored packed and run by the CPU kernels.

- ``SparseLinear.from_dense(linear, keep, pattern)`` packs a pruned ``nn.Linear``; ``to_dense()`` gives it back
  exactly (pruned weights are 0).
- Decode (few tokens): the sparse kernel. Prefill (many tokens): where the kernel loses to dense, the weight is
  expanded to dense tiles on the fly and the dense GEMM runs (the rule is measured per layout and dtype, see
  ``DENSE_MIN_TOKENS``, ``SparseLinear.dense_from_tokens`` and docs/kernels.md; ``sparsecraft bench`` prints it per layer).
- ``sparsify_model_(model, masks, pattern)`` swaps every masked Linear; ``save_packed_model`` /
  ``load_packed_model_`` write and read the packed model as one safetensors file, bit-exactly.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparsecraft.formats import from_tensors, pack
from sparsecraft.kernels import dense_tiles_linear, make_layout, sparse_linear
from sparsecraft.kernels.layout import BitmaskLayout, CsrLayout, Layout, layout_keep, layout_to_dense
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

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The on-disk packed format (sparsecraft.formats) of the weight."""
        return pack(self.dense_weight(), self.keep(), self.pattern).tensors()

    @property
    def nbytes(self) -> int:
        """Bytes of the in-memory layout (weight only)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out). Kept lean: at decode a SmolLM2 layer takes tens of microseconds.
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
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
            f"layout={self.kind}, bias={self.bias is not None}, prefill={prefill}"
        )


def _swap(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
        _swap(model, fqn, sparse)
        summary["replaced"].append(fqn)
        summary["layouts"][fqn] = sparse.kind
        summary["dense_bytes"] += linear.weight.numel() * linear.weight.element_size()
        summary["sparse_bytes"] += sparse.nbytes
    return summary


def save_packed_model(model: nn.Module, path: str) -> None:
    """One safetensors file in the packed-checkpoint layout of sparsecraft.checkpoint: every SparseLinear weight
    as ``"<fqn>.weight@<entry>"`` (docs/formats.md), all else dense, JSON metadata ``sparsecraft``."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"packed": {}, "aliases": {}, "pattern": None}
    sparse = {fqn: m for fqn, m in model.named_modules() if isinstance(m, SparseLinear)}
    for fqn, module in sparse.items():
        for name, t in module.packed_tensors().items():
            tensors[f"{fqn}.weight@{name}"] = t.contiguous()
        meta["packed"][f"{fqn}.weight"] = {"transposed": False}
        meta["pattern"] = meta["pattern"] or str(module.pattern)
        if module.bias is not None:
            tensors[f"{fqn}.bias"] = module.bias.contiguous()
    skip = tuple(f"{fqn}." for fqn in sparse)
    seen: dict[tuple[int, int, tuple], str] = {}
    for key, t in model.state_dict().items():
        if key.startswith(skip):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen and t.numel():  # tied weights are stored once
            meta["aliases"][key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.contiguous()
    save_file(tensors, path, metadata={"sparsecraft": json.dumps(meta)})


def load_packed_model_(model: nn.Module, path: str) -> dict:
    """Load a packed checkpoint (``save_packed_model`` or ``sparsecraft prune``'s sparse/model.safetensors) into a
    model of the same architecture, swapping each packed Linear for a SparseLinear. Bit-exact.

    Returns {"sparse": fqns now SparseLinear, "dense": packed weights loaded dense (e.g. GPT-2 Conv1D)}."""
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("sparsecraft", "null"))
        raw = load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"cannot read packed checkpoint {path} ({e}); the file is missing or corrupt") from None
    if meta is None:
        raise ValueError(f"{path} is not a sparsecraft packed checkpoint (no 'sparsecraft' metadata)")
    state = {k: v for k, v in raw.items() if "@" not in k}
    result: dict = {"sparse": [], "dense": []}
    for key, info in sorted(meta["packed"].items()):
        packed = from_tensors({k.split("@", 1)[1]: v for k, v in raw.items() if k.startswith(key + "@")})
        fqn = key.removesuffix(".weight")
        if info.get("transposed") or not isinstance(model.get_submodule(fqn), (nn.Linear, SparseLinear)):
            dense = packed.to_dense()
            state[key] = dense.T.contiguous() if info.get("transposed") else dense
            result["dense"].append(fqn)
            continue
        pattern = getattr(packed, "pattern", parse_pattern("unstructured"))
        bias = state.pop(f"{fqn}.bias", None)
        _swap(model, fqn, SparseLinear(make_layout(packed.to_dense(), packed.keep()), bias, pattern))
        result["sparse"].append(fqn)
    state.update({key: state[target] for key, target in meta["aliases"].items()})
    loaded = model.load_state_dict(state, strict=False)
    if loaded.unexpected_keys:
        raise ValueError(f"{path}: keys not in this model, e.g. {loaded.unexpected_keys[:3]}; same architecture?")
    prefixes = tuple(f"{fqn}." for fqn in result["sparse"])
    result["missing"] = [k for k in loaded.missing_keys if not k.startswith(prefixes)]
    return result
