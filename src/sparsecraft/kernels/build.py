"""Build (once, cached by torch under ~/.cache/torch_extensions) and load the C++ kernels, one build per ISA.

Route chosen by measurement (docs/kernels.md): a torch C++ extension compiled at first use with
``torch.utils.cpp_extension.load`` and ninja from PyPI. It costs one compile of about 70 s per ISA on 2 busy
cores, then loads in well under a second; it runs on torch's own OpenMP thread pool (``at::parallel_for``).

ISAs, fastest first (``ISAS``): ``"avx512"`` (masked expands; needs AVX-512 F/BW/VL/DQ/VBMI2 and BMI2),
``"avx2"`` (AVX2 + FMA lookup-table expansion), ``"ref"`` (the plain-torch reference, kernels/reference.py).
``available_isas()`` says which this CPU runs, read once from the CPU's flags, default first (AVX-512 on Intel, AVX2
on AMD, where the expand instructions are slow); callers choose per call with an ``isa=`` argument or for a region
of code with ``isa_scope(...)`` (a context variable, not an env var). When a build fails, ``load_kernels`` warns once and returns None, and callers use the reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

SOURCE = Path(__file__).parent / "csrc" / "sparse_cpu.cpp"
FLAGS = {
    "avx2": ["-O3", "-mavx2", "-mfma", "-mf16c", "-mpopcnt", "-fopenmp"],
    "avx512": ["-O3", "-mavx2", "-mfma", "-mf16c", "-mpopcnt", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
               "-mavx512vbmi2", "-mbmi2", "-DSPARSECRAFT_AVX512", "-fopenmp"],
}
ISAS = ("avx512", "avx2", "ref")  # fastest first
# /proc/cpuinfo flag names each compiled ISA needs (the compiler emits these instructions anywhere in the module).
_CPU_FLAGS = {
    "avx512": {"avx2", "fma", "f16c", "popcnt", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vbmi2"},
    "avx2": {"avx2", "fma", "f16c", "popcnt"},
}
_ISA = contextvars.ContextVar("sparsecraft_kernel_isa", default=None)


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The CPU feature flags from /proc/cpuinfo (Linux), or None where that file does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def _cpu_runs(isa: str) -> bool:
    if isa == "ref":
        return True
    flags = _cpu_flags()
    if flags is None:  # no /proc/cpuinfo: trust torch's own probe for AVX2 only (it does not report VBMI2)
        return isa == "avx2" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return _CPU_FLAGS[isa] <= flags


@functools.cache
def _amd() -> bool:
    try:
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@functools.cache
def available_isas() -> tuple[str, ...]:
    """The ISAs this CPU can run, the default first; always ends with "ref".

    On AMD the AVX2 build comes first even where AVX-512 runs: vexpandps/vpexpandw are slow on Zen 4/5 (measured
    here on a Zen 5 EPYC, 4096x4096 fp32 batch 1 streamed from memory: the AVX-512 expand 1.03x dense at 50%, the
    AVX2 lookup-table expand 1.85x; docs/kernels.md), while on Intel (Ice Lake and later) they are cheap."""
    runs = [isa for isa in ISAS if _cpu_runs(isa)]
    if _amd() and "avx512" in runs and "avx2" in runs:
        runs.remove("avx2")
        runs.insert(0, "avx2")
    return tuple(runs)


def cpu_has_avx2() -> bool:
    """True when this CPU can run the AVX2 kernels (AVX2 + FMA)."""
    return "avx2" in available_isas()


def check_isa(isa: str) -> str:
    """``isa`` if this CPU runs it, else ValueError saying which it does."""
    if isa not in ISAS:
        raise ValueError(f"unknown kernel ISA {isa!r}; choose one of {', '.join(ISAS)}")
    if isa not in available_isas():
        raise ValueError(f"this CPU cannot run the {isa} kernels; choose one of {', '.join(available_isas())}")
    return isa


def current_isa(isa: str | None = None) -> str:
    """The ISA a kernel call uses: ``isa`` when given, else the innermost ``isa_scope``, else this CPU's default."""
    chosen = isa or _ISA.get()
    return check_isa(chosen) if chosen else available_isas()[0]


@contextlib.contextmanager
def isa_scope(isa: str) -> Iterator[str]:
    """Run every kernel call inside the ``with`` block on ``isa`` ("avx512", "avx2" or "ref"), e.g. to time or test
    one ISA through a whole model: ``with isa_scope("avx2"): model.generate(...)``."""
    token = _ISA.set(check_isa(isa))
    try:
        yield isa
    finally:
        _ISA.reset(token)


def _ninja_on_path() -> None:
    """cpp_extension calls ``ninja`` by name; the PyPI wheel puts it next to the interpreter or in ninja.BIN_DIR."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # PyPI package "ninja"

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def compile_flags(isa: str) -> list[str]:
    """The compiler flags of ``isa``'s build on this CPU. AVX-512 expands read memory directly except on AMD,
    where the memory form of vexpandps is microcoded (csrc/sparse_cpu.cpp, ``expand16``)."""
    return FLAGS[isa] + (["-DSPARSECRAFT_EXPAND_FROM_MEMORY"] if isa == "avx512" and not _amd() else [])


def build_extension(prefix: str, source: Path, what: str, isa: str = "avx2") -> ModuleType | None:
    """Compile (or load the cached build of) one C++ source for ``isa``; None, with one warning naming ``what``,
    when the CPU cannot run it or the build fails. The module name carries a hash of the source, the shared headers
    and the flags, so an edited source is rebuilt instead of loading a stale binary."""
    if isa not in FLAGS or not _cpu_runs(isa):
        warnings.warn(f"sparsecraft: this CPU cannot run {isa} code; {what} use the slow plain-torch reference")
        return None
    flags = compile_flags(isa)
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # csrc/*.h are shared
    digest = hashlib.sha1(source.read_bytes() + headers + " ".join(flags).encode()).hexdigest()[:10]
    suffix = "" if isa == "avx2" else f"_{isa}"
    try:
        from torch.utils.cpp_extension import load

        _ninja_on_path()
        return load(name=f"{prefix}{suffix}_{digest}", sources=[str(source)], extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # compiler missing, headers missing, ninja missing: all mean "no fast path"
        warnings.warn(
            f"sparsecraft: could not build the {isa} kernels for {what} ({type(err).__name__}: {str(err)[:200]}); "
            f"falling back to the slow plain-torch reference. help: install gcc/g++ and `pip install ninja`"
        )
        return None


@functools.cache  # the compiled module is process-wide by nature; cache the load, not any tensor state
def _load(isa: str) -> ModuleType | None:
    if isa == "ref":
        return None
    module = build_extension("sparsecraft_cpu", SOURCE, "sparse layers", isa)
    if module is None and isa == "avx512":  # a compiler without AVX-512 support: the AVX2 build still runs
        return _load("avx2")
    return module


def load_kernels(isa: str | None = None) -> ModuleType | None:
    """The compiled sparse-weight kernel module for ``isa`` (default: ``current_isa()``), or None for "ref" or when
    it cannot be built here. ``module.isa`` names the build actually loaded."""
    return _load(current_isa(isa))
