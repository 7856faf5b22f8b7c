"""Allocations: exact global counts after the engine's rounding, bounds, determinism, OWL/ERK direction, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_model
from helpers_cli import make_checkpoint, make_text
from sparsecraft.allocation import erk, outlier_ratios, owl, realized_sparsity, uniform
from sparsecraft.api import allocate, prune
from sparsecraft.search import score_ranks
from sparsecraft.cli import main
from sparsecraft.patterns import num_pruned, parse_pattern

# awkward shapes so that per-layer rounding cannot hit the total by luck
SHAPES = {"b.0.q": (7, 13), "b.0.fc": (29, 13), "b.1.q": (7, 13), "b.1.fc": (29, 13), "b.2.out": (13, 31)}
TOTAL = sum(r * c for r, c in SHAPES.values())


def zeros_of(plan: dict[str, float], shapes=SHAPES) -> int:
    return sum(num_pruned(r * c, plan[k]) for k, (r, c) in shapes.items())


@pytest.mark.parametrize("target", [0.1, 0.37, 0.5, 0.61, 0.7, 0.9])
def test_every_allocation_hits_the_global_count_exactly(target):
    ratios = {k: v for k, v in zip(SHAPES, [0.01, 0.05, 0.02, 0.0, 0.03])}
    for plan in (uniform(SHAPES, target), erk(SHAPES, target), owl(ratios, SHAPES, target, lam=0.1)):
        assert zeros_of(plan) == num_pruned(TOTAL, target)
        assert realized_sparsity(plan, SHAPES) == num_pruned(TOTAL, target) / TOTAL


def test_bounds_are_respected_and_infeasible_bounds_say_how_to_fix():
    plan = erk(SHAPES, 0.6, min_sparsity=0.45, max_sparsity=0.8)
    assert zeros_of(plan) == num_pruned(TOTAL, 0.6)
    for k, (r, c) in SHAPES.items():
        z = num_pruned(r * c, plan[k])
        assert math.ceil(0.45 * r * c - 1e-9) <= z <= math.floor(0.8 * r * c + 1e-9)
    with pytest.raises(ValueError, match="widen"):
        uniform(SHAPES, 0.9, max_sparsity=0.8)


def test_erk_prunes_big_square_layers_more_and_owl_keeps_outlier_layers_denser():
    plan = erk({"small": (4, 64), "big": (64, 64)}, 0.5)
    assert plan["big"] > 0.5 > plan["small"]
    shapes = {"a": (10, 10), "b": (10, 10), "c": (10, 10)}
    o = owl({"a": 0.0, "b": 0.5, "c": 1.0}, shapes, 0.5, lam=0.1)
    assert o == {"a": 0.6, "b": 0.5, "c": 0.4}  # ratios -> [0, 0.2], centred on the target


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    w = torch.ones(2, 10)
    w[0, 0] = 100.0  # one score far above the mean of the 20 scores
    r = outlier_ratios({"x": w}, {"x": torch.ones(10)}, M=5.0)
    assert r == {"x": 1 / 20}


def test_block_pattern_counts_tiles_exactly():
    shapes = {"a": (8, 8), "b": (8, 16), "c": (16, 8)}
    plan = erk(shapes, 0.55, "2x2")
    tiles = {k: r * c // 4 for k, (r, c) in shapes.items()}
    assert sum(num_pruned(tiles[k], plan[k]) for k in shapes) == num_pruned(sum(tiles.values()), 0.55)


def test_score_ranks_reproduce_the_engine_wanda_mask():
    from sparsecraft.methods import LayerStats, get_method
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g)
    w[0, :4] = 1.0  # ties
    sq = torch.rand(16, generator=g)
    ranks = score_ranks({"x": w}, {"x": sq})["x"]
    from sparsecraft.patterns import split_counts
    _, keep = get_method("wanda").prune(w, LayerStats(sqnorm=sq), 0.6, parse_pattern("unstructured"), g)
    assert torch.equal(ranks >= split_counts(w.numel(), 6, 0.6).unsqueeze(1), keep)


@pytest.mark.parametrize("kind", ["erk", "owl", "search"])
def test_allocations_on_a_model_are_exact_after_pruning_and_deterministic(kind, calib):
    opts = {"generations": 1, "offspring": 2, "survivors": 1, "fitness_windows": 1} if kind == "search" else {}
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = allocate(model, kind, 0.63, "unstructured", calib, options=opts, seed=3, max_sparsity=0.9)
    again = allocate(model, kind, 0.63, "unstructured", calib, options=opts, seed=3, max_sparsity=0.9)
    assert plan == again
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is unchanged
    result = prune(model, "wanda", None, "unstructured", calib, layer_sparsity=plan, progress=False)
    total = sum(m.numel() for m in result.masks.values())
    zeros = sum(int((~m).sum()) for m in result.masks.values())
    assert len(result.masks) == 14 and zeros == num_pruned(total, 0.63)
    assert max(plan.values()) <= 0.9


def test_search_never_ends_worse_than_uniform_on_its_fitness_windows(calib):
    from sparsecraft.engine.blocks import prunable_layers, weight_2d
    from sparsecraft.engine.passes import input_sqnorms
    from sparsecraft.search import apply_ranked_plan_, kl_to_dense, token_logprobs
    model = tiny_model("llama")
    opts = {"generations": 3, "offspring": 3, "survivors": 2, "fitness_windows": 2, "step": 0.1}
    plan = allocate(model, "search", 0.5, calibration=calib, options=opts, seed=0)
    layers = prunable_layers(model)
    dense = {f: weight_2d(m).detach().clone() for f, m in layers.items()}
    ranks = score_ranks(dense, input_sqnorms(model, calib))
    windows = calib[-2:]
    ref = token_logprobs(model, windows, 8)

    def kl(p: dict[str, float]) -> float:
        apply_ranked_plan_(layers, dense, ranks, p)
        return kl_to_dense(model, windows, ref, 8)

    shapes = {f: tuple(d.shape) for f, d in dense.items()}
    assert kl(plan) <= kl(uniform(shapes, 0.5)) + 1e-9


def test_allocation_errors_say_how_to_fix(calib):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="valid allocations"):
        allocate(model, "greedy", 0.5, calibration=calib)
    with pytest.raises(ValueError, match="uniform"):
        allocate(model, "owl", None, "2:4", calib)
    with pytest.raises(ValueError, match="calibration"):
        allocate(model, "owl", 0.5)
    with pytest.raises(ValueError, match="valid: M, lam"):
        allocate(model, "owl", 0.5, calibration=calib, options={"m": 3})


def test_cli_prune_with_owl_allocation(tmp_path):
    ckpt, text = make_checkpoint(tmp_path / "tiny"), make_text(tmp_path / "t.txt")
    out = tmp_path / "out"
    args = ["prune", "--model", str(ckpt), "--calib", str(text), "--eval", str(text), "--nsamples", "4",
            "--seqlen", "32", "--eval-windows", "2", "--output", str(out), "--no-progress", "--sparsity", "0.6",
            "--allocation", "owl", "--method", "wanda+dsnot"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["allocation"] == "owl"
    layers = report["layers"]
    total = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    zeros = sum(round(v["sparsity"] * v["shape"][0] * v["shape"][1]) for v in layers.values())
    assert zeros == num_pruned(total, 0.6)
    assert len({round(v["target_sparsity"], 3) for v in layers.values()}) > 1  # not uniform
    assert main(args[:-4] + ["--allocation", "owl", "--pattern", "2:4", "--overwrite"]) == 2
