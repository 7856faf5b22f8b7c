"""``shrink``: choose structures by importance on calibration data, remove them physically, rewrite the config.

    result = shrink(model, calibration_windows, ShrinkConfig(params=0.75, axes=("mlp", "heads"), method="wanda"))

Reads top to bottom: plan widths -> (rotate) -> calibrate once on the dense model -> score -> remove -> check the
parameter count equals the plan.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sparsecraft.engine.blocks import find_blocks, weight_2d
from sparsecraft.structured import importance as imp
from sparsecraft.structured import gates as learned
from sparsecraft.structured import rotate, surgery
from sparsecraft.structured.arch import AXES, ArchSpec, head_dim, kv_heads, spec_for
from sparsecraft.structured.plan import Sizes, dense_sizes, plan
from sparsecraft.structured.stats import Calibration, calibrate

DEPTH_METHODS = ("block-influence", "angular")
LEARNED = "learned"  # hard-concrete gates trained with distillation choose neurons, KV groups and blocks (gates.py)


@dataclass(frozen=True)
class ShrinkConfig:
    params: float = 0.75  # fraction of the dense parameter count to keep, in (0, 1]
    axes: tuple[str, ...] = ("mlp",)  # any of mlp, heads, hidden, depth; one keep fraction for all of them
    method: str = "activation"  # width importance: magnitude, magnitude-l1, wanda, activation, flap, learned
    depth_method: str = "block-influence"  # or angular
    rotate: bool = False  # SliceGPT: rotate the residual stream by its PCA basis before removing hidden channels
    tolerance: float = 0.02  # how far (fraction of dense params) the uniform widths may land from ``params``
    batch_size: int = 4  # calibration windows per forward
    gates: learned.GateConfig = learned.GateConfig()  # training of the gates (method "learned" only)

    def __post_init__(self) -> None:
        if not 0 < self.params <= 1:
            raise ValueError(f"params must be a fraction of parameters to keep in (0, 1], got {self.params}")
        bad = [a for a in self.axes if a not in AXES]
        if bad or not self.axes:
            raise ValueError(f"unknown axes {bad or '(none)'}; choose a comma list of {', '.join(AXES)}")
        if self.method not in (*imp.METHODS, LEARNED):
            raise ValueError(f"unknown structured method {self.method!r}; choose one of "
                             f"{', '.join((*imp.METHODS, LEARNED))}")
        if self.method == LEARNED and "hidden" in self.axes:
            raise ValueError("learned gates cover mlp, heads and depth, not hidden channels; drop hidden from the "
                             "axes or use another method (activation, or --rotate) for it")
        if self.depth_method not in DEPTH_METHODS:
            raise ValueError(f"unknown depth method {self.depth_method!r}; choose one of {', '.join(DEPTH_METHODS)}")
        if self.rotate and "hidden" not in self.axes:
            raise ValueError("rotate only changes which hidden channels go; add hidden to the axes or drop rotate")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")


@dataclass
class ShrinkResult:
    dense_params: int
    params: int  # after removal; equals the planned count
    dense_sizes: dict[str, int]
    sizes: dict[str, int]
    dropped_blocks: list[int] = field(default_factory=list)
    kept: dict[str, list[int]] = field(default_factory=dict)  # "<block fqn>.mlp" / ".heads" / "hidden" -> indices
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kept_fraction(self) -> float:
        return self.params / self.dense_params

    def as_dict(self) -> dict:
        return {**asdict(self), "kept_fraction": self.kept_fraction}


def _w(block: nn.Module, name: str) -> torch.Tensor:
    return weight_2d(block.get_submodule(name))


def mlp_scores(block: nn.Module, fqn: str, spec: ArchSpec, cal: Calibration, method: str) -> torch.Tensor:
    """(F,) one score per MLP neuron of the block at ``fqn``."""
    x, h = cal.inputs.get(f"{fqn}.{spec.mlp_in[0]}"), cal.inputs.get(f"{fqn}.{spec.mlp_out}")
    score = imp.column_scores(method, _w(block, spec.mlp_out), h)
    for name in spec.mlp_in:
        score = score + imp.row_scores(method, _w(block, name), x)
    return score


def head_scores(block: nn.Module, fqn: str, spec: ArchSpec, cal: Calibration, method: str,
                config: object) -> torch.Tensor:
    """(G,) one score per KV group: its query heads' rows of q and columns of o, its KV head's rows of k and v."""
    D = head_dim(config)
    r = config.num_attention_heads // kv_heads(config)
    x, a = cal.inputs.get(f"{fqn}.{spec.q}"), cal.inputs.get(f"{fqn}.{spec.o}")
    score = imp.per_unit(imp.column_scores(method, _w(block, spec.o), a), r * D)
    score = score + imp.per_unit(imp.row_scores(method, _w(block, spec.q), x), r * D)
    for name in (spec.k, spec.v):
        score = score + imp.per_unit(imp.row_scores(method, _w(block, name), x), D)
    return score


def hidden_scores(model: nn.Module, spec: ArchSpec, cal: Calibration, method: str) -> torch.Tensor:
    """(C,) one score per residual channel, summed over every block's readers (columns) and writers (rows)."""
    fqn, blocks = find_blocks(model)
    inputs_of = {spec.q: spec.q, spec.k: spec.q, spec.v: spec.q, spec.o: spec.o,
                 **{n: spec.mlp_in[0] for n in spec.mlp_in}, spec.mlp_out: spec.mlp_out}
    score = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    for i, block in enumerate(blocks):
        for name in spec.readers:
            score += imp.column_scores(method, _w(block, name), cal.inputs.get(f"{fqn}.{i}.{inputs_of[name]}"))
        for name in spec.writers:
            score += imp.row_scores(method, _w(block, name), cal.inputs.get(f"{fqn}.{i}.{inputs_of[name]}"))
    if method.startswith("magnitude"):  # the embedding (and an untied head) hold the channel too
        score += imp.column_scores(method, model.get_submodule(spec.embed).weight, None)
    return score


def _bias_overrides(model: nn.Module, spec: ArchSpec, config: ShrinkConfig) -> dict[str, bool]:
    """FLAP compensates into the consumer's bias: turn on the config flag that creates it, where there is one."""
    if config.method != "flap":
        return {}
    out = {}
    if "mlp" in config.axes and spec.mlp_bias_key:
        out[spec.mlp_bias_key] = True
    if "heads" in config.axes and spec.attn_bias_key:
        out[spec.attn_bias_key] = True
    return out


def _enable_biases_(model: nn.Module, spec: ArchSpec, overrides: dict[str, bool]) -> None:
    _, blocks = find_blocks(model)
    for key in overrides:
        names = (*spec.mlp_in, spec.mlp_out) if key == spec.mlp_bias_key else (spec.q, spec.k, spec.v, spec.o)
        for block in blocks:
            for n in names:
                surgery.add_zero_bias_(block.get_submodule(n))
        setattr(model.config, key, True)


def _flap_mean(spec: ArchSpec, block: nn.Module, layer: str, cal: Calibration, fqn: str,
               method: str) -> torch.Tensor | None:
    if method != "flap" or block.get_submodule(layer).bias is None:
        return None
    return cal.inputs[f"{fqn}.{layer}"].mean


def _rotate_(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, batch_size: int) -> None:
    rotate.fold_norms_(model, spec)
    cal = calibrate(model, spec, windows, batch_size, stream_cov=True)
    rotate.rotate_(model, spec, rotate.principal_basis(cal.stream_cov))


@torch.no_grad()
def shrink(model: nn.Module, calibration: torch.Tensor, config: ShrinkConfig = ShrinkConfig()) -> ShrinkResult:
    """Shrink ``model`` in place to about ``config.params`` of its parameters; calibration (n, T) token ids."""
    t0 = time.perf_counter()
    spec = spec_for(model, config.axes)
    overrides = _bias_overrides(model, spec, config)
    if config.rotate:
        if not spec.rms_norm:
            raise ValueError(f"--rotate needs an RMSNorm (LLaMA-family) model, not {model.config.model_type}")
        overrides["tie_word_embeddings"] = False  # the rotation unties the head (see rotate.py)
    sizes, planned, total = plan(model, spec, config.axes, config.params, config.tolerance, overrides)
    dense = dense_sizes(model, spec)
    result = ShrinkResult(dense_params=total, params=0, dense_sizes=dense.as_dict(), sizes=sizes.as_dict())
    if config.rotate:
        _rotate_(model, spec, calibration, config.batch_size)
        result.notes.append("residual stream rotated by its PCA basis (SliceGPT, one Q); head untied")
    scores = None
    if config.method == LEARNED:  # on the dense model, before any surgery; blocks are chosen by their gates too
        scores, summary = _learn(model, spec, calibration, config, dense, sizes)
        result.notes.append(f"learned gates: {summary['steps']} steps in {summary['seconds']:.1f} s, final "
                            f"distillation loss {summary['kd_loss']:.4f}")
    needs_cal = config.method not in (LEARNED, "magnitude", "magnitude-l1") or (
        "depth" in config.axes and config.method != LEARNED)
    cal = calibrate(model, spec, calibration, config.batch_size) if needs_cal else Calibration()
    _enable_biases_(model, spec, {k: v for k, v in overrides.items() if k != "tie_word_embeddings"})
    if config.method == "flap" and not overrides.keys() - {"tie_word_embeddings"} and not _has_bias(model, spec):
        result.notes.append(f"FLAP bias compensation skipped: {model.config.model_type}'s config has no flag "
                            f"for an MLP/attention output bias")
    _apply(model, spec, config, cal, dense, sizes, result, scores)
    result.params = sum(p.numel() for p in model.parameters())
    assert result.params == planned, f"realized {result.params} parameters, planned {planned}"
    result.seconds = time.perf_counter() - t0
    return result


def _has_bias(model: nn.Module, spec: ArchSpec) -> bool:
    _, blocks = find_blocks(model)
    return blocks[0].get_submodule(spec.mlp_out).bias is not None


def _learn(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, config: ShrinkConfig, dense: Sizes,
           sizes: Sizes) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Gates on the axes that lose something, each aiming at its planned kept fraction."""
    goals = {a: getattr(sizes, a) / getattr(dense, a) for a in config.axes if getattr(sizes, a) < getattr(dense, a)}
    if not goals:
        return {}, {"steps": 0, "seconds": 0.0, "kd_loss": 0.0}
    return learned.learn_gates(model, spec, windows, goals, config.gates)


def _apply(model: nn.Module, spec: ArchSpec, config: ShrinkConfig, cal: Calibration, dense: Sizes, sizes: Sizes,
           result: ShrinkResult, scores: dict[str, torch.Tensor] | None = None) -> None:
    """Remove what the scores say; ``scores`` (learned log_alpha per axis) replaces the importance methods."""
    fqn, blocks = find_blocks(model)
    if sizes.depth < dense.depth:
        n = dense.depth - sizes.depth
        result.dropped_blocks = (sorted(torch.argsort(scores["depth"], stable=True)[:n].tolist()) if scores
                                 else imp.blocks_to_drop(cal.mean_cos(), n, config.depth_method))
    hidden_keep = None
    if sizes.hidden < dense.hidden:  # scored before any width changes (the scores read full-width weights)
        hidden_keep = (torch.arange(sizes.hidden) if config.rotate else
                       imp.keep_top(hidden_scores(model, spec, cal, config.method), sizes.hidden))
        result.kept["hidden"] = hidden_keep.tolist()
    for i, block in enumerate(blocks):
        if i in result.dropped_blocks:
            continue
        if sizes.mlp < dense.mlp:
            score = scores["mlp"][i] if scores else mlp_scores(block, f"{fqn}.{i}", spec, cal, config.method)
            keep = imp.keep_top(score, sizes.mlp)
            mean = _flap_mean(spec, block, spec.mlp_out, cal, f"{fqn}.{i}", config.method)
            surgery.shrink_mlp_(block, spec, keep, mean)
            result.kept[f"{fqn}.{i}.mlp"] = keep.tolist()
        if sizes.heads < dense.heads:
            score = (scores["heads"][i] if scores else
                     head_scores(block, f"{fqn}.{i}", spec, cal, config.method, model.config))
            keep = imp.keep_top(score, sizes.heads)
            mean = _flap_mean(spec, block, spec.o, cal, f"{fqn}.{i}", config.method)
            surgery.shrink_heads_(block, spec, model.config, keep, mean)
            result.kept[f"{fqn}.{i}.heads"] = keep.tolist()
    if hidden_keep is not None:
        surgery.shrink_hidden_(model, spec, hidden_keep)
        if config.rotate:
            rotate.rescale_norms_(model, spec, dense.hidden)
    if result.dropped_blocks:
        surgery.drop_blocks_(model, result.dropped_blocks)
    surgery.rewrite_config_(model, spec)
