"""Report plots: the blocks x layer-type grid behind the heatmaps, and the files written."""

from __future__ import annotations

import math

from sparsecraft.report import layer_grid, plots


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
