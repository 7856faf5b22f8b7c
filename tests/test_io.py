"""Durable writes: the file appears whole or not at all, and with the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from sparsecraft.io import atomic_save_tensors, atomic_write_text


def test_atomic_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save_tensors({"a": torch.arange(3)}, tmp_path / "t.safetensors")
        atomic_write_text(tmp_path / "r.md", "hi")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "t.safetensors").st_mode) == 0o644  # safetensors alone gives 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "r.md").st_mode) == 0o644
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["a"], torch.arange(3))


def test_a_failed_write_leaves_no_file_and_no_temp(tmp_path):
    with pytest.raises(Exception):
        atomic_save_tensors({"a": "not a tensor"}, tmp_path / "t.safetensors")  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []
