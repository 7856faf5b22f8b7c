"""Build (once, cached by torch under ~/.cache/torch_extensions) and load the AVX2 C++ kernels.

Route chosen by measurement (docs/kernels.md): a torch C++ extension compiled at first use with
``torch.utils.cpp_extension.load`` and ninja from PyPI. It costs one compile of about 70 s on 2 busy cores,
then loads in well under a second; it runs on torch's own OpenMP thread pool (``at::parallel_for``).
When the CPU lacks AVX2/FMA or the build fails, ``load_kernels`` warns once and returns None, and callers use the
plain-torch reference (kernels/reference.py).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "sparse_cpu.cpp"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-mpopcnt", "-fopenmp"]


def cpu_has_avx2() -> bool:
    """True when this CPU can run the kernels (AVX2 + FMA); read from torch's own dispatch probe."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _ninja_on_path() -> None:
    """cpp_extension calls ``ninja`` by name; the PyPI wheel puts it next to the interpreter or in ninja.BIN_DIR."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # PyPI package "ninja"

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def build_extension(prefix: str, source: Path, what: str) -> ModuleType | None:
    """Compile (or load the cached build of) one C++ source; None, with one warning naming ``what``, when the CPU
    lacks AVX2/FMA or the build fails. The module name carries a hash of the source, the shared headers and the
    flags, so an edited source is rebuilt instead of loading a stale binary."""
    if not cpu_has_avx2():
        warnings.warn(f"sparsecraft: this CPU has no AVX2/FMA; {what} use the slow plain-torch reference")
        return None
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # csrc/expand.h is shared
    digest = hashlib.sha1(source.read_bytes() + headers + " ".join(FLAGS).encode()).hexdigest()[:10]
    try:
        from torch.utils.cpp_extension import load

        _ninja_on_path()
        return load(name=f"{prefix}_{digest}", sources=[str(source)], extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # compiler missing, headers missing, ninja missing: all mean "no fast path"
        warnings.warn(
            f"sparsecraft: could not build the kernels for {what} ({type(err).__name__}: {str(err)[:200]}); "
            f"falling back to the slow plain-torch reference. help: install gcc/g++ and `pip install ninja`"
        )
        return None


@functools.cache  # the compiled module is process-wide by nature; cache the load, not any tensor state
def load_kernels() -> ModuleType | None:
    """The compiled sparse-weight kernel module, or None when it cannot be built here."""
    return build_extension("sparsecraft_cpu", SOURCE, "sparse layers")
