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
    out = assets["root"] / "measure"
    assert main(args(assets, "measure", out)) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats) == 14 and (out / "layer_stats.png").stat().st_size > 0
    assert all(0.0 <= row["near_zero"] <= 1.0 for row in stats)

    cal = assets["root"] / "calibrate"
    assert main(args(assets, "calibrate", cal, "--method", "wina", "--allocation", "greedy", "--sparsity", "0.4",
                     "--cost-windows", "2")) == 0
    plan = json.loads((cal / "thresholds.json").read_text())
    assert plan["planned"] == pytest.approx(0.4, abs=0.01)  # weight-weighted, measured on the calibration data
    specs = load_specs(cal / "thresholds.safetensors")
    assert set(specs) == set(plan["layers"]) and all(s.scale.shape[0] in (32, 64) for s in specs.values())
    assert (cal / "layer_sparsity.png").is_file()

    ev = assets["root"] / "eval"
    assert main(args(assets, "eval", ev, "--thresholds", str(cal / "thresholds.safetensors"))) == 0
    saved = json.loads((ev / "eval.json").read_text())
    assert saved["sparse"] == pytest.approx(plan["perplexity"]["sparse"], rel=1e-6)  # same thresholds, same text
    # the thresholds file is an input: an output folder holding it is refused, and nothing is touched
    assert main(args(assets, "eval", cal, "--thresholds", str(cal / "thresholds.safetensors"), "--overwrite")) == 2
    assert "overlaps the input" in capsys.readouterr().err and (cal / "thresholds.json").is_file()

    assert main(args(assets, "eval", ev, "--sparsities", "0.25,0.5", "--ppl-p", "5", "--allocation",
                     "greedy-block", "--overwrite")) == 0
    curve = json.loads((ev / "curve.json").read_text())
    assert [round(p["sparsity"], 6) for p in curve["points"]] == [0.25, 0.5]
    assert 0.0 <= curve["ppl_p"]["sparsity"] < 0.9
    assert "PPL-5% sparsity" in capsys.readouterr().out
    assert not (ev / "eval.json").exists()  # --overwrite replaced the whole folder


@pytest.mark.parametrize("extra,message", [
    (("--sparsity", "1.5"), "sparsity must be in"),
    (("--method", "relu"), "invalid choice: 'relu'"),
    (("--allocation", "owl"), "invalid choice: 'owl'"),
])
def test_bad_input_messages(assets, tmp_path, capsys, extra, message) -> None:
    try:
        code = main(args(assets, "calibrate", tmp_path / "o", *extra))
    except SystemExit as e:  # argparse's choices
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_sparsities_and_paths(assets, tmp_path, capsys) -> None:
    assert main(args(assets, "eval", tmp_path / "o", "--sparsities", "0.5,x")) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(args(assets, "eval", tmp_path / "o", "--thresholds", str(tmp_path / "none.safetensors"))) == 2
    assert "calibrate" in capsys.readouterr().err
