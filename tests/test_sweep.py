"""sparsecraft sweep: the knee on synthetic curves with a known knee, argument errors, the command end to end."""

from __future__ import annotations

import json
import math

import pytest

from helpers_cli import make_checkpoint, make_text
from sparsecraft.cli import main
from sparsecraft.commands.sweep import parse_sparsities
from sparsecraft.sweep import knee, knees


def test_knee_of_a_flat_then_steep_curve_is_where_it_turns():
    xs = [round(0.1 * i, 1) for i in range(1, 10)]
    ys = [10.0 if x <= 0.5 else 10.0 * math.exp(8 * (x - 0.5)) for x in xs]  # flat up to 50%, then explodes
    assert knee(xs, ys) == 0.5
    ys2 = [1.0 if x <= 0.7 else 1.0 + 30 * (x - 0.7) for x in xs]  # linear scale, knee at 70%
    assert knee(xs, ys2, log_y=False) == 0.7


def test_no_knee_without_an_upward_bend():
    xs = [0.1, 0.3, 0.5, 0.7, 0.9]
    assert knee(xs, [1, 2, 3, 4, 5], log_y=False) is None  # a straight line
    assert knee(xs, [5, 5, 5, 5, 5]) is None
    assert knee([0.1, 0.2], [1, 2]) is None
    with pytest.raises(ValueError, match="increasing"):
        knee([0.5, 0.1, 0.9], [1, 2, 3])


def test_knees_groups_rows_by_curve():
    rows = [{"method": "w", "pattern": "unstructured", "sparsity": s, "ppl": p}
            for s, p in [(0.7, 80.0), (0.1, 10.0), (0.3, 10.5), (0.5, 12.0), (0.9, 3000.0)]]
    rows.append({"method": "w", "pattern": "2:4", "sparsity": 0.5, "ppl": 50.0})
    assert knees(rows) == {"w unstructured": 0.5, "w 2:4": None}  # the last point before the jump


def test_parse_sparsities():
    assert parse_sparsities("0.1:0.5:0.2") == [0.1, 0.3, 0.5]
    assert parse_sparsities("0.7,0.5,0.5") == [0.5, 0.7]
    with pytest.raises(ValueError, match="start:stop:step"):
        parse_sparsities("a:b")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        parse_sparsities("50")


def test_sweep_command_end_to_end(tmp_path):
    ckpt, text = make_checkpoint(tmp_path / "tiny"), make_text(tmp_path / "t.txt")
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(ckpt), "--calib", str(text), "--eval", str(text), "--nsamples", "2",
            "--seqlen", "16", "--eval-windows", "2", "--methods", "wanda", "--no-progress",
            "--patterns", "unstructured,2:4", "--sparsities", "0.3,0.6", "--sensitivity", "--output", str(out)]
    assert main(args) == 0
    body = json.loads((out / "sweep.json").read_text())
    assert len(body["points"]) == 2 + 1
    assert all(abs(p["realized"] - p["sparsity"]) < 0.01 for p in body["points"])
    assert body["knee"] == {"wanda unstructured": None, "wanda 2:4": None}  # < 3 points: no knee
    assert [r["block"] for r in body["sensitivity"]] == ["model.layers.0", "model.layers.1"]
    assert (out / "plots" / "quality.png").is_file() and (out / "plots" / "sensitivity.png").is_file()
    assert "| wanda unstructured |" in (out / "sweep.md").read_text()
    assert main(args) == 2  # existing output without --overwrite
    assert main(args[:-2] + ["--methods", "obs", "--output", str(tmp_path / "x")]) == 2
