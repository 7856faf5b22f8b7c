"""`sparsecraft pack` and `sparsecraft bench` on a tiny local Llama checkpoint."""

import argparse
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsecraft.checkpoint import load_packed_state_dict, save_masks
from sparsecraft.commands import bench, pack
from sparsecraft.patterns import topk_mask


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("pruned")
    masks = {f: topk_mask(m.weight.detach().abs(), None, "2:4") for f, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in f}
    with torch.no_grad():
        for f, keep in masks.items():
            model.get_submodule(f).weight.mul_(keep)
    model.save_pretrained(folder)
    save_masks(masks, folder / "masks.safetensors")
    (folder / "settings.json").write_text(json.dumps({"pattern": "2:4"}))
    return folder, model, masks


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_pack_writes_an_exact_packed_checkpoint(pruned_dir, tmp_path):
    folder, model, masks = pruned_dir
    args = _parse(pack, ["pack", str(folder), "--output", str(tmp_path / "out")])
    assert args.func(args) == 0
    state = load_packed_state_dict(tmp_path / "out")
    for f, keep in masks.items():
        assert torch.equal(state[f"{f}.weight"], model.get_submodule(f).weight.detach())
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "settings.json").is_file()


def test_pack_errors_are_one_line_and_say_how_to_fix(pruned_dir, tmp_path):
    folder, _, _ = pruned_dir
    with pytest.raises(ValueError, match="overlaps the input"):  # an output inside the checkpoint: refused first
        args = _parse(pack, ["pack", str(tmp_path), "--output", str(tmp_path / "o")])
        args.func(args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="masks.safetensors"):
        args = _parse(pack, ["pack", str(tmp_path / "empty"), "--output", str(tmp_path / "o")])
        args.func(args)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "masks.safetensors").write_bytes((folder / "masks.safetensors").read_bytes())
    with pytest.raises(ValueError, match="settings.json"):
        args = _parse(pack, ["pack", str(bad), "--output", str(tmp_path / "o")])
        args.func(args)


def test_bench_prints_a_table_and_writes_plot(pruned_dir, tmp_path, capsys):
    folder, _, _ = pruned_dir
    args = _parse(bench, ["bench", str(folder), "--batch-sizes", "1,3,40", "--formats", "50%,2:4", "--rounds", "1",
                          "--output", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "winner" in out and "whole model" in out and "dense tiles" in out
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert {r["fmt"] for r in rows} == {"50%", "2:4", "ckpt"} and {r["batch"] for r in rows} == {1, 3, 40}
    assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["kernel_ms"] > 0 for r in rows)
    assert {r["path"] for r in rows if r["batch"] == 40} == {"dense tiles"}  # bitmask fp32: tiles from 32 tokens
    assert {r["path"] for r in rows if r["batch"] < 32} == {"kernel"}
    assert all(r["copies"] > 1 for r in rows)  # tiny layers: many copies, so every call streams from memory
    assert "kernel lost from" in out and "streams its weight from memory" in out
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bench_hot_times_one_copy(pruned_dir, tmp_path, capsys):
    folder, _, _ = pruned_dir
    args = _parse(bench, ["bench", str(folder), "--batch-sizes", "1", "--formats", "2:4", "--rounds", "1", "--hot",
                          "--isa", "ref", "--output", str(tmp_path)])
    assert args.func(args) == 0
    assert "isa=ref" in capsys.readouterr().out
    assert all(r["copies"] == 1 for r in json.loads((tmp_path / "bench.json").read_text()))


def test_bench_rejects_bad_formats():
    with pytest.raises(ValueError, match="50%"):
        bench.parse_formats("fifty")
    with pytest.raises(ValueError, match="batch-sizes"):
        bench.parse_batches("1,x")


def test_help_texts_render(capsys):
    for module in (bench, pack):
        with pytest.raises(SystemExit):
            _parse(module, [module.__name__.rsplit(".", 1)[1], "--help"])
    assert "--batch-sizes" in capsys.readouterr().out
