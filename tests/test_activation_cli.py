"""`sparsecraft activations measure|calibrate|eval` end to end on a tiny local model and a small text file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_cli import make_checkpoint, make_text
from sparsecraft.activation import load_specs
from sparsecraft.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("act_cli")
    return {"model": make_checkpoint(root / "tiny"), "text": make_text(root / "text.txt"), "root": root}


def args(assets, action: str, out: Path, *extra: str) -> list[str]:
    return ["activations", action, "--model", str(assets["model"]), "--calib", str(assets["text"]), "--eval",
            str(assets["text"]), "--nsamples", "6", "--seqlen", "32", "--eval-windows", "3", "--batch-size", "2",
            "--output", str(out), *extra]


def test_measure_calibrate_eval(assets, capsys) -> None:
    out = assets["root"] / "run"
    assert main(args(assets, "measure", out)) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats) == 14 and (out / "layer_stats.png").stat().st_size > 0
    assert all(0.0 <= row["near_zero"] <= 1.0 for row in stats)

    assert main(args(assets, "calibrate", out, "--method", "wina", "--allocation", "greedy", "--sparsity", "0.4",
                     "--cost-windows", "2")) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["planned"] == pytest.approx(0.4, abs=0.01)  # weight-weighted, measured on the calibration data
    specs = load_specs(out / "thresholds.safetensors")
    assert set(specs) == set(plan["layers"]) and all(s.scale.shape[0] in (32, 64) for s in specs.values())
    assert (out / "layer_sparsity.png").is_file()

    assert main(args(assets, "eval", out, "--thresholds", str(out / "thresholds.safetensors"))) == 0
    saved = json.loads((out / "eval.json").read_text())
    assert saved["sparse"] == pytest.approx(plan["perplexity"]["sparse"], rel=1e-6)  # same thresholds, same text

    assert main(args(assets, "eval", out, "--sparsities", "0.25,0.5", "--ppl-p", "5", "--allocation",
                     "greedy-block")) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert [round(p["sparsity"], 6) for p in curve["points"]] == [0.25, 0.5]
    assert 0.0 <= curve["ppl_p"]["sparsity"] < 0.9
    assert "PPL-5% sparsity" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (("--sparsity", "1.5"), "--sparsity must be in"),
    (("--method", "relu"), "use one of teal, wina"),
    (("--allocation", "owl"), "use one of uniform, greedy, greedy-block"),
])
def test_bad_input_messages(assets, tmp_path, capsys, extra, message) -> None:
    assert main(args(assets, "calibrate", tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err


def test_bad_sparsities_and_paths(assets, tmp_path, capsys) -> None:
    assert main(args(assets, "eval", tmp_path, "--sparsities", "0.5,x")) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(args(assets, "eval", tmp_path, "--thresholds", str(tmp_path / "none.safetensors"))) == 2
    assert "calibrate" in capsys.readouterr().err
