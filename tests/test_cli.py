"""`sparsecraft prune / eval / inspect` end to end on a tiny local model and a small text file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_cli import make_checkpoint, make_text
from sparsecraft.checkpoint import load_masks, load_packed_state_dict
from sparsecraft.cli import main
from sparsecraft.engine.resume import ResumeState


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {"model": make_checkpoint(root / "tiny"), "text": make_text(root / "text.txt"), "root": root}


def prune_args(assets, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(assets["model"]), "--calib", str(assets["text"]), "--eval", str(assets["text"]),
            "--nsamples", "6", "--seqlen", "32", "--eval-windows", "4", "--batch-size", "2", "--output", str(out),
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def pruned(assets) -> Path:
    out = assets["root"] / "out"
    assert main(prune_args(assets, out, "--method", "sparsegpt")) == 0
    return out


def test_outputs_and_report_schema(pruned):
    for name in ("config.json", "model.safetensors", "masks.safetensors", "settings.json", "report.json", "report.md",
                 "sparse/model.safetensors", "plots/layer_sparsity.png", "plots/layer_error.png",
                 "plots/perplexity.png", "tokenizer.json"):
        assert (pruned / name).is_file(), name
    assert not (pruned.parent / f".{pruned.name}.partial").exists()
    assert not (pruned.parent / f".{pruned.name}.staging").exists()
    report = json.loads((pruned / "report.json").read_text())
    assert report["settings"]["method"] == "sparsegpt" and report["seed"] == 0
    assert set(report["versions"]) >= {"torch", "transformers", "sparsecraft"}
    assert report["sparsity"]["overall_pruned_layers"] == 0.5
    assert report["sparsity"]["by_layer_type"]["q_proj"] == 0.5
    assert len(report["layers"]) == 14
    masks = load_masks(pruned / "masks.safetensors")
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert report["parameters"]["nonzero_after"] == report["parameters"]["total"] - zeros
    assert report["perplexity"]["dense"] > 1 and report["perplexity"]["sparse"] > 1
    assert report["bytes"]["pruned_layers_packed"] < 0.56 * report["bytes"]["pruned_layers_dense"]


def test_speed_row_of_an_in_memory_prune(assets, tmp_path):
    assert main(prune_args(assets, tmp_path / "o", "--no-stream", "--eval-windows", "0")) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    speed = report["speed"]  # the packed copy decodes exactly what the masked dense model decodes
    assert speed["same_tokens"] == 1.0 and speed["speedup"] == speed["packed_tok_s"] / speed["dense_tok_s"]
    assert "decode tokens/s (this machine)" in (tmp_path / "o" / "report.md").read_text()
    assert main(prune_args(assets, tmp_path / "p", "--no-stream", "--eval-windows", "0", "--no-speed")) == 0
    assert "speed" not in json.loads((tmp_path / "p" / "report.json").read_text())


def test_block_reconstruction_from_the_cli(assets, tmp_path):
    """--reconstruct-steps runs (not streamed), reports every block's error before/after (after <= before), keeps the
    masks exact, and the settings record the target and lr."""
    out = tmp_path / "r"
    assert main(prune_args(assets, out, "--method", "sparsegpt", "--reconstruct-steps", "3", "--reconstruct-lr",
                           "1e-3", "--eval-windows", "0", "--no-speed")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["reconstruct_target"] == "dense" and report["settings"]["reconstruct_lr"] == 1e-3
    recon = report["reconstruction"]
    assert sorted(recon) == ["0", "1"] and all(r["after"] <= r["before"] and r["steps"] == 3 for r in recon.values())
    assert any(r["after"] < r["before"] for r in recon.values())  # the steps did move some block's weights
    weights, masks = load_file(str(out / "model.safetensors")), load_masks(out / "masks.safetensors")
    for fqn, keep in masks.items():
        assert (weights[f"{fqn}.weight"][~keep] == 0).all()
    assert report["sparsity"]["overall_pruned_layers"] == 0.5


def test_hf_reload_gives_exact_pruned_weights_and_packed_roundtrip(pruned):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pruned)
    saved = load_file(str(pruned / "model.safetensors"))
    masks = load_masks(pruned / "masks.safetensors")
    sd = model.state_dict()
    for fqn, keep in masks.items():
        assert torch.equal(sd[fqn + ".weight"], saved[fqn + ".weight"])
        assert (sd[fqn + ".weight"][~keep] == 0).all()
    packed = load_packed_state_dict(pruned / "sparse")
    assert set(packed) == set(sd)
    assert all(torch.equal(packed[k], sd[k]) for k in sd)


def test_pack_of_a_prune_output_equals_its_packed_file(pruned, tmp_path):
    assert main(["pack", str(pruned), "--output", str(tmp_path / "packed"), "-q"]) == 0
    again, original = (load_packed_state_dict(d) for d in (tmp_path / "packed", pruned / "sparse"))
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)
    assert (tmp_path / "packed" / "settings.json").is_file()


def test_same_seed_same_result(assets, pruned, tmp_path):
    out = tmp_path / "again"
    assert main(prune_args(assets, out, "--method", "sparsegpt")) == 0
    a, b = load_masks(pruned / "masks.safetensors"), load_masks(out / "masks.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (pruned, out))
    assert ra["perplexity"] == rb["perplexity"] and ra["layers"].keys() == rb["layers"].keys()
    assert all(ra["layers"][k]["error"] == rb["layers"][k]["error"] for k in ra["layers"])


def test_resume_equals_uninterrupted(assets, pruned, tmp_path, monkeypatch):
    # the in-memory path (--no-stream) against the default streamed output; streamed resume: test_prune_stream_cli.py
    out = tmp_path / "resumed"
    original = ResumeState.save

    def save_then_die(self, i, result, calls):
        original(self, i, result, calls)
        if i == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumeState, "save", save_then_die)
    assert main(prune_args(assets, out, "--method", "sparsegpt", "--no-stream")) == 130
    assert not (out / "report.json").exists() and (tmp_path / ".resumed.partial" / "progress.json").is_file()
    monkeypatch.setattr(ResumeState, "save", original)
    assert main(prune_args(assets, out, "--method", "sparsegpt", "--no-stream")) == 2  # an unfinished run, no --resume
    assert main(prune_args(assets, out, "--method", "sparsegpt", "--no-stream", "--resume")) == 0
    a, b = load_file(str(pruned / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (pruned, out))
    assert ra["perplexity"] == rb["perplexity"]
    assert {k: v["error"] for k, v in ra["layers"].items()} == {k: v["error"] for k, v in rb["layers"].items()}


def test_resume_with_other_settings_is_refused(assets, tmp_path, monkeypatch):
    out = tmp_path / "r2"

    def die(self, i, result, calls):
        raise KeyboardInterrupt

    monkeypatch.setattr(ResumeState, "save", die)
    assert main(prune_args(assets, out, "--no-stream")) == 130
    monkeypatch.undo()
    assert main(prune_args(assets, out, "--no-stream", "--seed", "3", "--resume")) == 2


def test_settings_file_and_inspect(assets, tmp_path, capsys):
    plan = tmp_path / "settings.yaml"
    plan.write_text("method: magnitude\npattern: '2:4'\nexclude: ['*.self_attn.*']\n"
                    "layer_sparsity: {model.layers.0.mlp.up_proj: 0.5}\n")
    out = tmp_path / "p"
    assert main(prune_args(assets, out, "--settings", str(plan))) == 0
    saved = json.loads((out / "settings.json").read_text())
    assert saved["method"] == "magnitude" and saved["pattern"] == "2:4" and saved["exclude"] == ["*.self_attn.*"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in table and "2:4" in table and "self_attn" not in table
    # the written settings repeat the run exactly
    again = tmp_path / "p2"
    assert main(prune_args(assets, again, "--settings", str(out / "settings.json"))) == 0
    a, b = load_masks(out / "masks.safetensors"), load_masks(again / "masks.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_command(assets, capsys):
    assert main(["eval", str(assets["model"]), "--eval", str(assets["text"]), "--seqlen", "32",
                 "--eval-windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--sparsity", "1.2"], "sparsity must be in [0, 1)"),
    (["--pattern", "5:4"], "invalid N:M pattern 5:4"),
    (["--seqlen", "100"], "longer than the model's context"),
    (["--method", "sparsegpt", "--sparsity", "-0.5"], "sparsity must be in [0, 1)"),
    (["--method", "obs"], "invalid choice: 'obs'"),
])
def test_bad_input_messages(assets, tmp_path, capsys, extra, message):
    code = 0
    try:
        code = main(prune_args(assets, tmp_path / "bad", *extra))
    except SystemExit as e:  # argparse's own checks (choices, types) exit from parse_args
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_paths(assets, tmp_path, capsys):
    cases = [
        (["prune", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "does not exist"),
        (["prune", "--model", str(assets["model"]), "--calib", str(tmp_path / "none.txt"), "--output",
          str(tmp_path / "o1")], "does not exist"),
        (["prune", "--model", str(assets["model"]), "--calib", str(assets["text"]), "--seqlen", "32",
          "--nsamples", "2", "--eval", str(assets["text"]), "--eval-windows", "1", "--output",
          str(tmp_path / "o5"), "--method", "sparsegpt", "--dampening", "-1"], "dampening"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases.append((["prune", "--model", str(assets["model"]), "--calib", str(empty), "--output", str(tmp_path / "o2")],
                  "is empty"))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    cases.append((["prune", "--model", str(assets["model"]), "--calib", str(binary), "--output",
                   str(tmp_path / "o3")], "UTF-8"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((assets["model"] / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    cases.append((["prune", "--model", str(corrupt), "--output", str(tmp_path / "o4")], "could not load model"))
    cases.append((["inspect", str(corrupt / "model.safetensors")], "corrupt"))
    for argv, message in cases:
        assert main(argv + (["--no-progress"] if argv[0] == "prune" else [])) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
