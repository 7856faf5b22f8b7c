"""Activation sparsity: measure it, induce it with calibrated thresholds (TEAL, WINA, greedy allocation), evaluate it.

    stats = measure(model, calib_windows)                      # one dense pass, streaming histograms per Linear input
    specs = calibrate(stats, 0.5, "teal")                       # or "wina"; or a dict fqn -> sparsity
    with attach(model, specs) as att:                           # buffers on each Linear + forward pre-hooks
        ppl = perplexity(model, eval_windows)
    plan = greedy_allocation(layer_costs(model, calib_windows, stats), target=0.5)
"""

from sparsecraft.activation.allocation import LayerCosts, greedy_allocation, layer_costs, model_sparsity
from sparsecraft.activation.curve import CurvePoint, evaluate_plan, ppl_p_sparsity, sparsity_curve
from sparsecraft.activation.measure import linear_targets, measure, summarize
from sparsecraft.activation.stats import InputStats, LayerSummary
from sparsecraft.activation.thresholds import (
    THRESHOLD_METHODS,
    ActivationThreshold,
    Attachment,
    ThresholdSpec,
    attach,
    calibrate,
    load_specs,
    load_thresholds,
    save_thresholds,
)

__all__ = [
    "THRESHOLD_METHODS", "ActivationThreshold", "Attachment", "CurvePoint", "InputStats", "LayerCosts", "LayerSummary",
    "ThresholdSpec", "attach", "calibrate", "evaluate_plan", "greedy_allocation", "layer_costs", "linear_targets",
    "load_specs", "load_thresholds", "measure", "model_sparsity", "ppl_p_sparsity", "save_thresholds",
    "sparsity_curve", "summarize",
]
