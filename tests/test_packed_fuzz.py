"""Fuzz: deterministic mutations of small packed files (bit flips in the header and the data, edited shapes, dtypes
and lengths, keys injected or dropped, metadata edits). Each must load to the right weights or raise ONE clear
ValueError; loading runs in a child process, so a crash fails this test instead of killing the run."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsecraft.checkpoint import load_packed_state_dict, save_packed
from sparsecraft.patterns import topk_mask

N_BYTE_FLIPS = 120


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 32, bias=False), nn.ReLU(), nn.Linear(32, 16))


def write_base(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    model = make_model()
    masks = {"0": topk_mask(model[0].weight.abs(), 0.5, "unstructured"),
             "2": topk_mask(model[2].weight.abs(), 0.9, "unstructured")}  # bitmask and (in memory) CSR
    path = folder / "base.safetensors"
    save_packed(model, masks, None, path)
    nm = folder / "nm.safetensors"
    save_packed(model, {"4": topk_mask(model[4].weight.abs(), None, "2:4")}, "2:4", nm)
    return path, load_packed_state_dict(path)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def tensor_mutations(path: Path) -> list[tuple[str, dict[str, torch.Tensor], dict[str, str]]]:
    """(name, tensors, metadata) edits that keep the file valid safetensors, so the sparsecraft checks see them."""
    tensors, meta = read(path)
    info = json.loads(meta["sparsecraft"])
    out = []

    def edit(name: str, change) -> None:
        t, m = {k: v.clone() for k, v in tensors.items()}, dict(meta)
        change(t, m)
        out.append((name, t, m))

    def unsigned(meta_: dict[str, str]) -> None:  # the same edit by someone who also rewrote the checksums away
        body = json.loads(meta_["sparsecraft"])
        body.pop("sha256", None)
        meta_["sparsecraft"] = json.dumps(body)

    for key in sorted(tensors):
        for signed in (True, False):
            tag = f"{key}{'' if signed else '-unsigned'}"

            def fin(m):
                if not signed:
                    unsigned(m)
            edit(f"drop {tag}", lambda t, m, k=key: (t.pop(k), fin(m)))
            edit(f"shorter {tag}", lambda t, m, k=key: (t.__setitem__(k, t[k].reshape(-1)[:-1].clone()), fin(m)))
            edit(f"longer {tag}", lambda t, m, k=key: (t.__setitem__(k, torch.cat([t[k].reshape(-1),
                                                                                   t[k].reshape(-1)[:1]])), fin(m)))
            edit(f"dtype {tag}", lambda t, m, k=key: (t.__setitem__(k, t[k].to(torch.int32 if t[k].is_floating_point()
                                                                               else torch.float32)), fin(m)))
            edit(f"2-d {tag}", lambda t, m, k=key: (t.__setitem__(k, t[k].reshape(1, -1).clone()), fin(m)))
            if t_is_int(tensors[key]):
                edit(f"max {tag}", lambda t, m, k=key: (t[k].reshape(-1).__setitem__(-1, torch.iinfo(t[k].dtype).max),
                                                       fin(m)))
                edit(f"zero {tag}", lambda t, m, k=key: (t[k].zero_(), fin(m)))
                edit(f"ones {tag}", lambda t, m, k=key: (t[k].fill_(255 if t[k].dtype == torch.uint8 else 1), fin(m)))
    for fqn in ("0", "2"):
        for name in ("row_ptr", "col", "mask", "values"):  # a crafted layout key next to the packed weight
            edit(f"inject {fqn}.{name}", lambda t, m, f=fqn, n=name: t.__setitem__(f"{f}.{n}", torch.zeros(3)))
            edit(f"inject-unsigned {fqn}.{name}", lambda t, m, f=fqn, n=name: (
                t.__setitem__(f"{f}.{n}", torch.zeros(3)), unsigned(m)))
    edit("inject unknown@", lambda t, m: t.__setitem__("0.weight@extra", torch.zeros(2)))
    edit("inject foreign key", lambda t, m: (t.__setitem__("9.weight", torch.zeros(2, 2)), unsigned(m)))
    edit("no metadata", lambda t, m: m.clear())
    edit("metadata not json", lambda t, m: m.__setitem__("sparsecraft", "{nope"))
    edit("metadata a list", lambda t, m: m.__setitem__("sparsecraft", "[]"))
    for key in info["packed"]:
        edit(f"unlist {key}", lambda t, m, k=key: m.__setitem__("sparsecraft", json.dumps(
            {**info, "packed": {p: v for p, v in info["packed"].items() if p != k}})))
        edit(f"transposed {key}", lambda t, m, k=key: m.__setitem__("sparsecraft", json.dumps(
            {**info, "packed": {**info["packed"], k: {"transposed": True}}})))
        edit(f"transposed str {key}", lambda t, m, k=key: m.__setitem__("sparsecraft", json.dumps(
            {**info, "packed": {**info["packed"], k: {"transposed": "yes"}}})))
    edit("alias to nowhere", lambda t, m: m.__setitem__("sparsecraft", json.dumps({**info, "aliases": {"4.weight":
                                                                                                          "nope"}})))
    edit("alias loop", lambda t, m: m.__setitem__("sparsecraft", json.dumps({**info, "aliases": {"4.bias":
                                                                                                    "0.weight"}})))
    return out


def t_is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and t.dtype != torch.bool


def byte_flips(path: Path, n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Single-bit flips: half in the header (JSON), half in the data."""
    raw = path.read_bytes()
    head = 8 + struct.unpack("<Q", raw[:8])[0]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pos = rng.randrange(0, head) if i % 2 == 0 else rng.randrange(head, len(raw))
        b = bytearray(raw)
        b[pos] ^= 1 << rng.randrange(8)
        out.append((f"flip byte {pos}", bytes(b)))
    for cut in (0, 7, 8, head - 1, head, len(raw) - 1):
        out.append((f"truncate at {cut}", raw[:cut]))
    out.append(("huge header length", struct.pack("<Q", 2**40) + raw[8:]))
    return out


def test_mutated_packed_files_load_right_or_fail_clearly(tmp_path):
    base, dense = write_base(tmp_path)
    torch.save({k: v for k, v in dense.items()}, tmp_path / "ref.pt")
    files: dict[str, str] = {}
    for i, (name, tensors, meta) in enumerate(tensor_mutations(base)):
        p = tmp_path / f"t{i}.safetensors"
        save_file(tensors, str(p), metadata=meta)
        files[str(p)] = name
    for i, (name, blob) in enumerate(byte_flips(base, N_BYTE_FLIPS)):
        p = tmp_path / f"b{i}.safetensors"
        p.write_bytes(blob)
        files[str(p)] = name
    assert len(files) >= 200, len(files)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fuzz_packed_child.py")),
                           str(Path(__file__).parent), str(tmp_path / "ref.pt"), *files],
                          capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = [r for r in lines if r["outcome"] != "start"]
    last = lines[-1] if lines else None
    assert proc.returncode == 0, f"child died (rc {proc.returncode}) on {files.get(last['file']) if last else '?'}: " \
                                 f"{proc.stderr[-2000:]}"
    assert len(done) == len(files)
    crashes = [(files[r["file"]], r["message"]) for r in done if r["outcome"] == "crash"]
    wrong = [files[r["file"]] for r in done if r["outcome"] == "ok" and not r["same"]]
    multi_line = [files[r["file"]] for r in done if r["outcome"] == "error" and "\n" in r["message"]]
    assert not crashes, crashes[:10]
    assert not wrong, f"loaded with wrong weights: {wrong[:10]}"
    assert not multi_line, multi_line[:10]
    errors = sum(r["outcome"] == "error" for r in done)
    print(f"{len(files)} mutated files: {errors} refused with one clear error, {len(done) - errors} loaded right")
    assert errors >= 0.8 * len(files)  # most mutations must be refused; the rest provably loaded the right weights
