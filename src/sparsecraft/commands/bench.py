"""``sparsecraft bench MODEL_OR_CHECKPOINT``: will sparsity speed up this model's layers on this machine?

For every distinct Linear shape of the model, and each sparse format (unstructured at several sparsities, N:M,
or the checkpoint's own masks), time the dense ``F.linear`` and the packed ``SparseLinear`` kernel at each batch
size, interleaved in the same run; print who wins and by how much, per layer shape and for the whole model (each
shape weighted by how often it occurs), and save a plot and the numbers. Batch sizes at or above a layer's prefill
threshold also time what ``SparseLinear`` really runs there (dense tiles instead of the kernel) and say so.

Timed as decoding runs: a decode step reads every weight from memory once, so each side cycles through enough
distinct copies of the layer to exceed twice the last-level cache (``--hot`` times one copy hot in cache instead).
The winner column, the whole-model verdict and the "kernel lost from N tokens" line that checks the prefill rule all
come from that measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sparsecraft.kernels import current_isa, isa_scope, load_kernels, sparse_linear
from sparsecraft.kernels.measure import Cycle, copies_to_stream, tensor_bytes, time_interleaved
from sparsecraft.commands.pack import load_model_only
from sparsecraft.models import parse_dtype
from sparsecraft.patterns import NM, parse_pattern, topk_mask
from sparsecraft.modules import SparseLinear

DEFAULT_FORMATS = "50%,2:4,70%,90%"


@dataclass(frozen=True)
class Result:
    shape: str  # "out x in"
    count: int  # how many Linear layers of the model have this shape
    fmt: str
    layout: str
    batch: int
    dense_ms: float
    sparse_ms: float  # what SparseLinear runs at this batch: the kernel, or dense tiles from its prefill threshold
    path: str = "kernel"  # "kernel" | "dense tiles"
    kernel_ms: float = 0.0  # the sparse kernel itself (same as sparse_ms on the kernel path)
    copies: int = 1  # distinct copies cycled per side (> 1: each call streams its weight from memory, as decode does)

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure dense vs sparse Linear speed per layer shape on this machine",
                       description=__doc__.splitlines()[0])
    p.add_argument("model", help="HF id, HF folder, .gguf file, 'default', or a pruned checkpoint folder "
                                 "(its masks.safetensors are then measured too)")
    p.add_argument("--batch-sizes", default="1,4,8", help="tokens per call, comma separated (default 1,4,8)")
    p.add_argument("--formats", default=DEFAULT_FORMATS,
                   help=f"sparsities like 50%% or 0.5, N:M like 2:4 (default {DEFAULT_FORMATS.replace('%', '%%')})")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per point (default 7)")
    p.add_argument("--hot", action="store_true",
                   help="time one copy of each layer again and again, hot in cache (default: cycle through enough "
                        "copies that every call streams its weight from memory, as a decode step does)")
    p.add_argument("--isa", default=None, help="kernel ISA: avx512 | avx2 | ref (default: this CPU's best)")
    p.add_argument("--output", default="bench_out", help="folder for bench.png and bench.json (default bench_out)")
    p.set_defaults(func=run)


def parse_formats(text: str) -> list[tuple[str, object, float | None]]:
    """'50%,2:4,0.9' -> [(label, pattern, sparsity)]."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if ":" in item or "x" in item:
            out.append((item, parse_pattern(item), None))
            continue
        try:
            value = float(item.rstrip("%")) / (100 if item.endswith("%") else 1)
        except ValueError:
            raise ValueError(f"bad format {item!r}; use sparsities like 50% or 0.5, or N:M like 2:4") from None
        if not 0 < value < 1:
            raise ValueError(f"sparsity {item!r} is outside (0, 1); write 50% or 0.5")
        out.append((f"{100 * value:g}%", parse_pattern("unstructured"), value))
    return out


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must be integers like 1,4,8, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch-sizes must be positive integers like 1,4,8, got {text!r}")
    return batches


def layer_shapes(model: nn.Module) -> dict[tuple[int, int], list[str]]:
    """(out, in) -> fqns of the Linear layers with that weight shape."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for fqn, m in model.named_modules():
        if isinstance(m, nn.Linear):
            shapes.setdefault(tuple(m.weight.shape), []).append(fqn)
    return shapes


def measure(linear: nn.Linear, keep: torch.Tensor, pattern, label: str, count: int, batches: list[int],
            rounds: int, stream: bool = True) -> list[Result]:
    """Dense vs sparse at each batch. With ``stream`` (the default) every call reads its weight from memory, as a
    decode step does (each token reads every weight once): both sides cycle through enough distinct copies of the
    layer to exceed twice the last-level cache. Without it, one copy is called again and again, hot in cache,
    which flatters whichever side fits in cache and says nothing about decoding."""
    ruled = SparseLinear.from_dense(linear, keep, pattern)  # its own prefill rule
    w = torch.where(keep, linear.weight.detach(), torch.zeros((), dtype=linear.weight.dtype))
    n = copies_to_stream(min(tensor_bytes(w), ruled.nbytes)) if stream else 1
    modules = [ruled] + [copy.deepcopy(ruled) for _ in range(n - 1)]
    weights = [w] + [w.clone() for _ in range(n - 1)]
    start = ruled.dense_from_tokens()
    results = []
    for b in batches:
        x = torch.randn(b, linear.in_features).to(w.dtype)
        fns = {"dense": Cycle(lambda wi: torch.nn.functional.linear(x, wi), weights),
               "kernel": Cycle(lambda m: sparse_linear(m.layout, x, m.bias), modules)}  # the kernel at any batch
        tiles = start is not None and b >= start
        if tiles:
            fns["module"] = Cycle(lambda m: m(x), modules)
        t = time_interleaved(fns, rounds, calls=max(3, n))
        shape = f"{linear.out_features}x{linear.in_features}"
        sparse = t["module"] if tiles else t["kernel"]
        results.append(Result(shape, count, label, ruled.kind, b, 1e3 * t["dense"], 1e3 * sparse,
                               "dense tiles" if tiles else "kernel", 1e3 * t["kernel"], n))
    return results


def measured_prefill(results: list[Result]) -> dict[tuple[str, str], tuple[int | None, int | None]]:
    """(shape, format) -> (the module's rule: dense tiles from this many tokens, the smallest batch measured here at
    which the sparse kernel loses to dense; None = never / not within the batches tried)."""
    out: dict[tuple[str, str], tuple[int | None, int | None]] = {}
    for r in results:
        key = (r.shape, r.fmt)
        rule, lost = out.get(key, (None, None))
        if r.path == "dense tiles" and (rule is None or r.batch < rule):
            rule = r.batch
        if r.dense_ms < r.kernel_ms and (lost is None or r.batch < lost):
            lost = r.batch
        out[key] = (rule, lost)
    return out


def print_table(results: list[Result]) -> None:
    print(f"{'shape':>11} {'n':>3} {'format':>7} {'layout':>7} {'B':>3} {'dense ms':>9} {'sparse ms':>9} "
          f"{'path':>11}  winner")
    for r in results:
        win = f"sparse {r.speedup:.2f}x" if r.speedup >= 1 else f"dense {1 / r.speedup:.2f}x"
        note = f"  (kernel alone {r.dense_ms / r.kernel_ms:.2f}x)" if r.path != "kernel" else ""
        print(f"{r.shape:>11} {r.count:>3} {r.fmt:>7} {r.layout:>7} {r.batch:>3} {r.dense_ms:9.3f} {r.sparse_ms:9.3f} "
              f"{r.path:>11}  {win}{note}")
    print("\nprefill rule vs this measurement (first batch at which the kernel lost to dense):")
    for (shape, fmt), (rule, lost) in measured_prefill(results).items():
        rule_text = f"dense tiles from {rule} tokens" if rule is not None else "kernel at every batch tried"
        lost_text = f"{lost} tokens" if lost is not None else "never, within the batches tried"
        print(f"  {shape:>11} {fmt:>7}: rule {rule_text}; kernel lost from {lost_text}")
    print("\nwhole model (every Linear, weighted by count):")
    for fmt in dict.fromkeys(r.fmt for r in results):
        for b in dict.fromkeys(r.batch for r in results):
            rows = [r for r in results if r.fmt == fmt and r.batch == b]
            dense, sparse = sum(r.count * r.dense_ms for r in rows), sum(r.count * r.sparse_ms for r in rows)
            verdict = "sparse wins" if sparse < dense else "dense wins"
            print(f"  {fmt:>7} B={b:<3} dense {dense:8.2f} ms  sparse {sparse:8.2f} ms  {dense / sparse:.2f}x  {verdict}")


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(dict.fromkeys(r.batch for r in results))
    fmts = list(dict.fromkeys(r.fmt for r in results))
    shapes = list(dict.fromkeys(r.shape for r in results))
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False, sharey=True)
    width = 0.8 / max(1, len(fmts))
    for ax, b in zip(axes[0], batches):
        for i, fmt in enumerate(fmts):
            by_shape = {r.shape: r.speedup for r in results if r.batch == b and r.fmt == fmt}
            xs = [j + i * width for j, s in enumerate(shapes) if s in by_shape]
            ax.bar(xs, [by_shape[s] for s in shapes if s in by_shape], width, label=fmt)
        ax.axhline(1.0, color="black", lw=1)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=30, fontsize=8)
        ax.set_title(f"batch {b}")
    axes[0][0].set_ylabel("speedup over dense (>1: sparse wins)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    batches, formats = parse_batches(args.batch_sizes), parse_formats(args.formats)
    dtype = parse_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    isa = current_isa(args.isa)
    if load_kernels(isa) is None:
        print("warning: compiled kernels unavailable here; sparse timings are the slow plain-torch reference")
    model = load_model_only(args.model, dtype)
    folder = Path(args.model)
    masks = {}
    if folder.is_dir() and (folder / "masks.safetensors").is_file():
        from sparsecraft.checkpoint import load_masks

        masks = load_masks(folder / "masks.safetensors")
    results: list[Result] = []
    with torch.inference_mode(), isa_scope(isa):
        for shape, fqns in layer_shapes(model).items():
            linear = model.get_submodule(fqns[0])
            for label, pattern, sparsity in formats:
                if isinstance(pattern, NM) and shape[1] % pattern.m:
                    continue  # N:M needs in_features divisible by m
                keep = topk_mask(linear.weight.detach().float().abs(), sparsity, pattern)
                results += measure(linear, keep, pattern, label, len(fqns), batches, args.rounds, not args.hot)
            masked = [f for f in fqns if f in masks]
            if masked:
                results += measure(model.get_submodule(masked[0]), masks[masked[0]], "unstructured", "ckpt",
                                   len(masked), batches, args.rounds, not args.hot)
    timing = "hot in cache (--hot)" if args.hot else "each call streams its weight from memory, as decode does"
    print(f"threads={torch.get_num_threads()} dtype={args.dtype} isa={isa} timing: {timing}")
    print_table(results)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "bench.png")
    (out / "bench.json").write_text(json.dumps([asdict(r) | {"speedup": r.speedup} for r in results], indent=1))
    print(f"\nwrote {out / 'bench.png'} and {out / 'bench.json'}")
    return 0
