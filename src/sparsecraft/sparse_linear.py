"""``SparseLinear``: a Linear layer whose weight is stored packed and run by the CPU kernels.

- ``SparseLinear.from_dense(linear, keep, pattern)`` packs a pruned ``nn.Linear``; ``to_dense()`` gives it back
  exactly (pruned weights are 0).
- Decode (few tokens): the sparse kernel. Prefill (many tokens): the weight is expanded to dense on the fly and
  the dense GEMM runs, because at many tokens the product is compute bound and the dense GEMM wins (the threshold
  is measured, see ``DENSE_MIN_TOKENS`` and docs/kernels.md).
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
from sparsecraft.kernels import expand_dense, make_layout, sparse_linear
from sparsecraft.kernels.layout import BitmaskLayout, CsrLayout, Layout, layout_keep, layout_to_dense
from sparsecraft.patterns import Pattern, parse_pattern, satisfies

# From this many tokens per call on, expand the weight and run the dense GEMM (measured on a 2-core AVX2 EPYC:
# bench/bench_kernels.py --prefill). Below it the sparse kernel, which re-reads the packed weight once per 8
# tokens, is faster than or level with dense.
DENSE_MIN_TOKENS = 32
PACKED_KEY = "weight_packed"  # safetensors prefix of a packed weight: "<fqn>.weight_packed.<entry>"


def use_dense_path(tokens: int, dense_min_tokens: int = DENSE_MIN_TOKENS) -> bool:
    """The prefill rule: True when a call with ``tokens`` rows should run dense."""
    return tokens >= dense_min_tokens


class SparseLinear(nn.Module):
    """y = x @ W.T + b with W held in a kernel layout (bitmask or CSR) as buffers."""

    def __init__(self, layout: Layout, bias: torch.Tensor | None, pattern: Pattern, use_kernel: bool = True):
        super().__init__()
        self.in_features, self.out_features = layout.shape[1], layout.shape[0]
        self.pattern = pattern
        self.use_kernel = use_kernel
        self.dense_min_tokens = DENSE_MIN_TOKENS
        self.kind = "csr" if isinstance(layout, CsrLayout) else "bitmask"
        self.skip_zero_bytes = isinstance(layout, BitmaskLayout) and layout.skip_zero_bytes
        if isinstance(layout, CsrLayout):
            self.register_buffer("col", layout.col)
        else:
            self.register_buffer("mask", layout.mask)
        self.register_buffer("values", layout.values)
        self.register_buffer("row_ptr", layout.row_ptr)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

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
        if self.kind == "csr":
            return CsrLayout(self.col, self.values, self.row_ptr, self.in_features)
        return BitmaskLayout(self.mask, self.values, self.row_ptr, self.in_features, self.skip_zero_bytes)

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
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        if use_dense_path(x2.shape[0], self.dense_min_tokens):
            weight = expand_dense(self.layout, self.use_kernel).to(x.dtype)  # (out, in), freed after the call
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = torch.nn.functional.linear(x2, weight, bias)
        else:
            y = sparse_linear(self.layout, x2, self.bias, self.use_kernel)  # (tokens, out)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
            f"layout={self.kind}, bias={self.bias is not None}"
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
    """One safetensors file: packed weights as ``<fqn>.weight_packed.<entry>``, all else as in state_dict."""
    tensors: dict[str, torch.Tensor] = {}
    sparse = {fqn: m for fqn, m in model.named_modules() if isinstance(m, SparseLinear)}
    for fqn, module in sparse.items():
        for key, t in module.packed_tensors().items():
            tensors[f"{fqn}.{PACKED_KEY}.{key}"] = t.contiguous()
        if module.bias is not None:
            tensors[f"{fqn}.bias"] = module.bias.contiguous()
    skip = tuple(f"{fqn}." for fqn in sparse)
    for key, t in model.state_dict().items():
        if not key.startswith(skip):
            tensors[key] = t.contiguous()
    _save_untied(tensors, path)


def _save_untied(tensors: dict[str, torch.Tensor], path: str) -> None:
    """safetensors refuses shared storage (tied embeddings): store each tensor once, by its first key."""
    seen: dict[tuple[int, int, tuple], str] = {}
    out, aliases = {}, {}
    for key, t in tensors.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen and t.numel():
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        out[key] = t
    save_file(out, path, metadata={"sparsecraft_aliases": json.dumps(aliases)})


def load_packed_model_(model: nn.Module, path: str) -> dict:
    """Load ``save_packed_model`` output into a model with the same architecture (dense Linears are swapped
    for SparseLinear where the file holds packed weights). Returns {"sparse": [...fqns]}."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("sparsecraft_aliases", "{}"))
    tensors.update({alias: tensors[target] for alias, target in aliases.items()})
    packed: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if f".{PACKED_KEY}." in key:
            fqn, _, entry = key.partition(f".{PACKED_KEY}.")
            packed.setdefault(fqn, {})[entry] = t
        else:
            rest[key] = t
    for fqn, d in sorted(packed.items()):
        p = from_tensors(d)
        bias = rest.pop(f"{fqn}.bias", None)
        pattern = getattr(p, "pattern", parse_pattern("unstructured"))
        layout = make_layout(p.to_dense(), p.keep())
        _swap(model, fqn, SparseLinear(layout, bias, pattern))
    result = model.load_state_dict(rest, strict=False)
    sparse_prefixes = tuple(f"{fqn}." for fqn in packed)
    missing = [k for k in result.missing_keys if not k.startswith(sparse_prefixes)]
    if result.unexpected_keys:
        raise ValueError(f"{path}: keys not in this model: {result.unexpected_keys[:5]}; is it the same architecture?")
    return {"sparse": sorted(packed), "missing": missing}
