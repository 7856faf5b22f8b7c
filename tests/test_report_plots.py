"""Report plots: the blocks x layer-type grid behind the heatmaps, and the files written."""

from __future__ import annotations

import math

from sparsecraft.report import layer_grid, plots, speed_rows


def rec(fqn: str, sparsity: float, error: float) -> dict:
    return {"fqn": fqn, "sparsity": sparsity, "error": error}


def test_layer_grid_places_each_layer_by_block_and_type():
    layers = [rec("model.layers.0.self_attn.q_proj", 0.5, 0.01), rec("model.layers.0.mlp.up_proj", 0.6, 0.2),
              rec("model.layers.1.self_attn.q_proj", 0.7, 0.03)]
    blocks, kinds, grid = layer_grid(layers, "sparsity")
    assert blocks == [0, 1] and kinds == ["self_attn.q_proj", "mlp.up_proj"]
    assert grid[0] == [0.5, 0.6] and grid[1][0] == 0.7 and math.isnan(grid[1][1])  # block 1 has no up_proj


def test_plots_write_heatmaps_and_labelled_bars(tmp_path):
    layers = {f"model.layers.{b}.mlp.{k}": rec(f"model.layers.{b}.mlp.{k}", 0.5, 10.0 ** -(b + 1))
              for b in range(3) for k in ("up_proj", "down_proj")}
    report = {"layers": layers, "perplexity": {"dense": 10.0, "sparse": 12.5}}
    made = plots(report, tmp_path)
    assert made == ["layer_sparsity.png", "layer_error.png", "perplexity.png"]
    assert all((tmp_path / f).stat().st_size > 2000 for f in made)


def test_speed_row_flags_a_busy_machine():
    speed = {"dense_tok_s": 10.0, "packed_tok_s": 15.0, "speedup": 1.5, "same_tokens": 1.0, "threads": 2, "cpus": 2}
    rows = speed_rows({**speed, "load_average": 2.4})  # our own 2 threads: not busy
    assert rows == [("decode tokens/s (this machine)", "10.0", "15.0 (1.50x, same tokens 100%)")]
    rows = speed_rows({**speed, "load_average": 3.1})  # one more runnable thread than CPUs + 0.5
    assert len(rows) == 2 and rows[1][0] == "decode timing" and "load average 3.1 on 2 CPUs" in rows[1][2]
    assert speed_rows({k: v for k, v in speed.items() if k != "cpus"}) == rows[:1]  # older reports
