"""Durable writes: every file sparsecraft writes goes through here.

- ``atomic_write_bytes`` / ``atomic_save_tensors``: write a temporary sibling, fsync it, rename it over the target,
  fsync the folder. A reader sees the old file or the new one, never half of one, even after a power cut.
- ``check_output`` refuses outputs that would destroy the user's data (an input, the working directory, a folder
  sparsecraft did not write) BEFORE anything is read or written.
- ``StagedOutput`` builds a new output folder beside the old one and swaps it in only when complete: a failure at
  any point leaves the previous output exactly as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save_file

# Every output folder sparsecraft writes carries this file; --overwrite replaces only folders that have it.
MARKER = ".sparsecraft-output"


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _file_mode() -> int:
    """0o666 less the process umask: what a plain open() would create (safetensors creates files as 0o600). The
    umask is read from /proc (Linux); setting it to read it back would briefly give other threads umask 0."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, _file_mode())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        tmp.write_bytes(data)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                        metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically; tensors are made contiguous CPU copies first."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _overlaps(a: Path, b: Path) -> bool:
    """a equals b, or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def check_output(output: str | Path, inputs: Iterable[str | Path | None] = (), *, overwrite: bool = False,
                 allow_existing: bool = False) -> Path:
    """Validate an output folder before anything is touched; -> its resolved path.

    Refused whatever the flags: an output that equals, contains or lies inside an input; the working directory or
    one of its parents; an existing file. Refused without ``overwrite``: an existing non-empty folder. Refused even
    with ``overwrite``: a non-empty folder that sparsecraft did not write (no marker file). ``allow_existing`` lets
    a resume reuse its own output folder.
    """
    out = Path(output).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ValueError(f"output {output} is the current directory or one of its parents; choose a new folder "
                         f"such as runs/NAME")
    for inp in inputs:
        if inp is None or str(inp).lower() in ("", "default", "shakespeare"):
            continue
        p = Path(inp).expanduser()
        if not p.exists():
            continue  # a hub id, not a local path
        if _overlaps(out, p.resolve()):
            raise ValueError(f"output {output} overlaps the input {inp} (equal, inside or containing it); choose "
                             f"an output folder outside every input")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {output} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not allow_existing:
        if not (out / MARKER).is_file():
            raise ValueError(f"output folder {output} is not empty and was not written by sparsecraft; refusing to "
                             f"replace it even with --overwrite. Choose a new folder")
        if not overwrite:
            raise ValueError(f"output folder {output} exists; pass --overwrite to replace it, or choose another "
                             f"--output")
    return out


class StagedOutput:
    """``with StagedOutput(out) as stage: write into stage.path`` -> swapped into ``out`` when the block succeeds.

    The staging folder is a sibling (``.NAME.staging``) so the final renames stay on one filesystem. On success the old
    output is renamed aside, the new one renamed in, and the old one removed; on failure the staging folder is removed
    and the old output is untouched.
    """

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output).resolve()
        self.path = self.output.with_name(f".{self.output.name}.staging")

    def __enter__(self) -> "StagedOutput":
        if self.path.exists():
            shutil.rmtree(self.path)  # a previous crash's leftovers: ours by name
        self.path.mkdir(parents=True)
        (self.path / MARKER).write_text("written by sparsecraft; `--overwrite` may replace this folder\n")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        self.commit()

    def commit(self) -> None:
        aside = self.output.with_name(f".{self.output.name}.old")
        if aside.exists():
            shutil.rmtree(aside)
        if self.output.exists():
            os.replace(self.output, aside)
        os.replace(self.path, self.output)
        fsync_dir(self.output.parent)
        shutil.rmtree(aside, ignore_errors=True)
