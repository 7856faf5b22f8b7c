"""Streaming prune and perplexity of a sharded safetensors checkpoint: equal to the in-memory engine bit for bit,
resumable, flat in memory as blocks are added, and strict about broken checkpoints."""

from __future__ import annotations

import subprocess
import sys

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from sparsecraft.api import prune
from sparsecraft.engine.stream import perplexity_streaming, prune_streaming
from sparsecraft.evaluate import perplexity
from sparsecraft.memory import PeakMemory

from conftest import VOCAB


def save_llama(folder: Path, layers: int = 3, hidden: int = 32, ffn: int = 64, tie: bool = False,
               shard: str = "20KB") -> None:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size=shard)


def load(folder: Path) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("method,tie", [("wanda", False), ("sparsegpt", True), ("magnitude", False)])
def test_streaming_equals_in_memory(tmp_path, calib, method, tie):
    save_llama(tmp_path / "src", tie=tie)
    assert len(json.loads((tmp_path / "src/model.safetensors.index.json").read_text())["weight_map"]) > 0
    data = None if method == "magnitude" else calib
    ref = load(tmp_path / "src")
    expected = prune(ref, method=method, sparsity=0.5, calibration=data, batch_size=2, progress=False)
    got = prune_streaming(tmp_path / "src", tmp_path / "out", method=method, sparsity=0.5, calibration=data,
                          batch_size=2, progress=False)
    out = load(tmp_path / "out")
    for key, value in ref.state_dict().items():
        assert torch.equal(value, out.state_dict()[key]), key
    assert set(got.masks) == set(expected.masks)
    for fqn, keep in expected.masks.items():
        assert torch.equal(keep, got.masks[fqn]), fqn
    assert got.sparsity == expected.sparsity == 0.5
    assert {f: r.error for f, r in got.layers.items()} == pytest.approx(
        {f: r.error for f, r in expected.layers.items()}, nan_ok=True)
    assert (out.lm_head.weight is out.model.embed_tokens.weight) == tie
    assert "model.safetensors.index.json" in {p.name for p in (tmp_path / "out").iterdir()}
    assert not list((tmp_path / "out").glob("hidden-*")) and not (tmp_path / "out/progress.json").exists()


def test_streaming_perplexity_equals_in_memory(tmp_path):
    save_llama(tmp_path / "src", tie=True)
    windows = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(3))
    expected = perplexity(load(tmp_path / "src"), windows, batch_size=2)
    assert perplexity_streaming(tmp_path / "src", windows, batch_size=2) == expected


def test_resume_after_a_crash_equals_uninterrupted(tmp_path, calib):
    save_llama(tmp_path / "src", layers=4)
    whole = prune_streaming(tmp_path / "src", tmp_path / "whole", method="sparsegpt", calibration=calib,
                            batch_size=2, progress=False)

    def crash(i, _result):
        if i == 1:
            raise KeyboardInterrupt  # a kill after block 1 was saved

    with pytest.raises(KeyboardInterrupt):
        prune_streaming(tmp_path / "src", tmp_path / "out", method="sparsegpt", calibration=calib, batch_size=2,
                        progress=False, on_block_done=crash)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="different settings"):
        prune_streaming(tmp_path / "src", tmp_path / "out", method="sparsegpt", sparsity=0.6, calibration=calib,
                        batch_size=2, progress=False, resume=True)
    seen = []
    resumed = prune_streaming(tmp_path / "src", tmp_path / "out", method="sparsegpt", calibration=calib,
                              batch_size=2, progress=False, resume=True, on_block_done=lambda i, r: seen.append(i))
    assert seen == [2, 3]  # blocks 0 and 1 were not redone
    assert set(resumed.layers) == set(whole.layers)
    a, b = load(tmp_path / "whole").state_dict(), load(tmp_path / "out").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(whole.masks[f], resumed.masks[f]) for f in whole.masks)


PEAK_CHILD = """
import resource, sys, torch
from sparsecraft.engine.stream import prune_streaming
calib = torch.randint(0, int(sys.argv[3]), (2, 16), generator=torch.Generator().manual_seed(1))
prune_streaming(sys.argv[1], sys.argv[2], method="wanda", calibration=calib, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_peak_memory_stays_flat_as_blocks_are_added(tmp_path):
    # blocks of about 1M fp32 parameters (4 MiB): 3 blocks vs 24 blocks, the checkpoint grows by about 90 MiB. Each
    # prune runs in a fresh process, so neither inherits the other's heap (an in-process peak drifts with it).
    peaks, sizes = [], []
    for layers in (3, 24):
        save_llama(tmp_path / f"src{layers}", layers=layers, hidden=256, ffn=1024, shard="8MB")
        sizes.append(sum(p.stat().st_size for p in (tmp_path / f"src{layers}").glob("*.safetensors")))
    for layers in (3, 24):
        done = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(tmp_path / f"src{layers}"),
                               str(tmp_path / f"out{layers}"), str(VOCAB)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks.append(int(done.stdout.split()[-1]))
    growth = sizes[1] - sizes[0]
    assert growth > 75 * 2**20
    print(f"peak RSS {peaks[0] / 2**20:.0f} MiB (3 blocks) vs {peaks[1] / 2**20:.0f} MiB (24 blocks); checkpoint "
          f"{sizes[0] / 2**20:.0f} vs {sizes[1] / 2**20:.0f} MiB")
    assert peaks[1] - peaks[0] < 0.25 * growth, (peaks, sizes)  # in memory it would grow by the whole difference


def test_bad_checkpoints_are_named(tmp_path, calib):
    save_llama(tmp_path / "src")
    shards = sorted((tmp_path / "src").glob("model-*.safetensors"))

    def broken(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "src", folder)
        return folder

    missing = broken("missing")
    (missing / shards[1].name).unlink()
    with pytest.raises(ValueError, match=f"shard {shards[1].name} .* is missing"):
        prune_streaming(missing, tmp_path / "o1", calibration=calib, progress=False)

    wrong = broken("wrong")
    tensors = load_file(str(wrong / shards[-1].name))
    key = next(iter(tensors))
    tensors[key] = torch.zeros(3, 5)
    save_file(tensors, str(wrong / shards[-1].name))
    with pytest.raises(ValueError, match=f"tensor {key} in .*{shards[-1].name} has shape \\[3, 5\\]"):
        prune_streaming(wrong, tmp_path / "o2", calibration=calib, progress=False)

    lacking = broken("lacking")
    index = json.loads((lacking / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    tensors = load_file(str(lacking / index["weight_map"][key]))
    del tensors[key]
    save_file(tensors, str(lacking / index["weight_map"][key]))
    with pytest.raises(ValueError, match=f"tensor {key} is in .* but that shard does not hold it"):
        prune_streaming(lacking, tmp_path / "o3", calibration=calib, progress=False)
    del index["weight_map"][key]
    (lacking / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"tensor {key} is missing from the checkpoint"):
        prune_streaming(lacking, tmp_path / "o4", calibration=calib, progress=False)

    with pytest.raises(ValueError, match="neither model.safetensors.index.json nor model.safetensors"):
        prune_streaming(tmp_path / "nothing_here", tmp_path / "o5", calibration=calib, progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
