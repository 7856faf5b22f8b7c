"""Typed settings of the commands: frozen dataclasses, type-checked, round-tripping to JSON/YAML.

The CLI builds every command's flags from its dataclass (``sparsecraft.commands.options``), so a setting is spelled
once. Settings that several commands share (model, texts, window counts, seed, device, dtype) take their default
and help text from ``SHARED``: one place, one default.

``RunConfig`` is the settings file of ``prune`` (``--settings FILE``, written back as ``settings.json``): the
same keys as the flags, plus ``layer_sparsity`` (fqn -> sparsity), ``include`` / ``exclude`` (fnmatch patterns)
and ``method_options``.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from sparsecraft.allocation import ALLOCATIONS
from sparsecraft.activation.thresholds import THRESHOLD_METHODS
from sparsecraft.engine.reconstruct import TARGETS as RECONSTRUCT_TARGETS
from sparsecraft.methods import METHODS
from sparsecraft.models import DTYPES, check_device
from sparsecraft.patterns import NM, check_sparsity, parse_pattern

# name -> (default, help). Used by every command that has the setting.
SHARED: dict[str, tuple[Any, str]] = {
    "model": ("default", "Hugging Face id, local HF folder (dense or packed) or .gguf file; 'default' = the "
                         "embedded SmolLM2-135M"),
    "calib": ("shakespeare", "calibration text: a file, a folder of .txt files, or 'shakespeare' (the default "
                             "corpus' calibration works)"),
    "eval": ("shakespeare", "evaluation text: a file, a folder, or 'shakespeare' (held-out works: Hamlet, Macbeth, "
                            "Othello)"),
    "nsamples": (64, "calibration windows"),
    "seqlen": (512, "tokens per window (calibration and evaluation)"),
    "eval_windows": (16, "evaluation windows of seqlen tokens (0 = skip perplexity)"),
    "seed": (0, "random seed (calibration windows, the random method)"),
    "device": ("auto", "auto (cuda when present, else cpu) | cpu | cuda | cuda:N"),
    "dtype": ("auto", "auto (the checkpoint's own float type; bfloat16 for .gguf) | float32 | bfloat16 | float16"),
    "batch_size": (8, "windows per forward pass"),
    "calib_dataset": (None, "calibration text from a `datasets` dataset instead of --calib: NAME[:config][:split] "
                            "(hub name online, local folder of .json/.jsonl/.txt files offline; split: train)"),
    "eval_dataset": (None, "evaluation text from a `datasets` dataset instead of --eval: NAME[:config][:split] "
                           "(split: test, else validation)"),
    "tasks": ([], "lm-evaluation-harness tasks, comma-separated (names, task YAML files, or tasks in --task-path); "
                  "needs pip install 'sparsecraft[eval]'"),
    "task_path": (None, "folder of your own lm-eval task YAML files (lm-eval's --include_path)"),
    "task_limit": (None, "at most this many documents per task (a quick look, not a comparable score)"),
}


def shared(name: str, **metadata: Any) -> Any:
    """A dataclass field with the shared default and help of ``name``."""
    default, help_text = SHARED[name]
    if isinstance(default, list):
        return field(default_factory=list(default).copy, metadata={"help": help_text, **metadata})
    return field(default=default, metadata={"help": help_text, **metadata})


def opt(default: Any, help_text: str, **metadata: Any) -> Any:
    """A dataclass field with its help text (and optional ``choices``: a callable returning the valid values)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_text, **metadata})
    return field(default=default, metadata={"help": help_text, **metadata})


# ---- type checking of settings read from files or flags ---------------------------------------------------------

def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _check_value(key: str, value: Any, kind: Any) -> Any:
    """``value`` as ``kind`` or a ValueError naming the key and the expected type. A string where a list of strings
    is expected is taken as a one-element list (``include: "*.q_proj"`` means one pattern, not eight letters)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(key, value, inner[0])
    bad = ValueError(f"setting {key!r} must be {_type_name(kind)}, got {type(value).__name__} {value!r}")
    if kind is Any:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {_check_value(f"{key} key", k, args[0]): _check_value(f"{key}[{k!r}]", v, args[1])
                for k, v in value.items()}
    raise TypeError(f"unsupported setting type {kind!r} for {key!r}")


C = TypeVar("C")


def check_settings(cls: type[C], settings: dict[str, Any], what: str = "settings") -> dict[str, Any]:
    """Unknown keys and wrong types raise one line naming the key; -> the checked values."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid keys: {', '.join(sorted(known))}")
    return {k: _check_value(k, v, hints[k]) for k, v in settings.items()}


def config_from_dict(cls: type[C], settings: dict[str, Any], what: str = "settings") -> C:
    """Build ``cls`` from a mapping: unknown keys and wrong types raise one line naming the key."""
    return cls(**check_settings(cls, settings, what))


def read_settings(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON settings file -> dict (validated by the command's config)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"settings file {path} does not exist; pass a YAML or JSON file")
    try:
        text = p.read_text(encoding="utf-8")
        body = yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse settings file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(body, dict):
        raise ValueError(f"settings file {path} must hold a mapping of settings, e.g. 'method: wanda'")
    return body


def check_common(cfg: Any) -> None:
    for name in ("nsamples", "seqlen", "batch_size"):
        if hasattr(cfg, name) and getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if getattr(cfg, "seqlen", 2) < 2:
        raise ValueError(f"seqlen must be >= 2, got {cfg.seqlen}")
    if getattr(cfg, "eval_windows", 0) < 0:
        raise ValueError(f"eval_windows must be >= 0, got {cfg.eval_windows}")
    if hasattr(cfg, "dtype") and cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}; use auto or one of {', '.join(DTYPES)}")
    if hasattr(cfg, "device"):
        check_device(cfg.device)
    for files, dataset in (("calib", "calib_dataset"), ("eval", "eval_dataset")):
        if getattr(cfg, dataset, None) is not None and getattr(cfg, files) != SHARED[files][0]:
            raise ValueError(f"--{files} and --{dataset.replace('_', '-')} both give the {files} text; pass one")
    if getattr(cfg, "task_limit", None) is not None and cfg.task_limit < 1:
        raise ValueError(f"task_limit must be >= 1, got {cfg.task_limit}")


@dataclass(frozen=True)
class RunConfig:
    """Settings of ``sparsecraft prune``."""

    model: str = shared("model")
    method: str = opt("wanda", "pruning method", choices=lambda: sorted(METHODS))
    sparsity: float | None = opt(None, "fraction of weights set to zero, in [0, 1) (default 0.5; an N:M pattern "
                                       "fixes it)")
    pattern: str = opt("unstructured", "unstructured | N:M such as 2:4 (n kept per m) | block such as 4x4")
    calib: str = shared("calib")
    eval: str = shared("eval")
    calib_dataset: str | None = shared("calib_dataset")
    eval_dataset: str | None = shared("eval_dataset")
    nsamples: int = shared("nsamples")
    seqlen: int = shared("seqlen")
    eval_windows: int = shared("eval_windows")
    tasks: list[str] = shared("tasks")
    task_path: str | None = shared("task_path")
    task_limit: int | None = shared("task_limit")
    seed: int = shared("seed")
    device: str = shared("device")
    dtype: str = shared("dtype")
    batch_size: int = shared("batch_size")
    allocation: str = opt("uniform", "per-layer sparsity: uniform | erk | owl | search (options in the settings "
                                     "file's allocation_options)", choices=lambda: list(ALLOCATIONS))
    reconstruct_steps: int = opt(0, "after each block is pruned, optimise its kept weights on the block output "
                                    "error for this many steps (0 = off)")
    reconstruct_target: str = opt("dense", "what reconstruction matches: dense = the dense model's block outputs "
                                           "(also corrects earlier blocks' error), local = the dense block on the "
                                           "pruned inputs", choices=lambda: list(RECONSTRUCT_TARGETS))
    reconstruct_lr: float = opt(1e-4, "Adam learning rate of block reconstruction")
    layer_sparsity: dict[str, float] = opt({}, "per-layer sparsity by module fqn (settings file only)", cli=False)
    include: list[str] = opt([], "fnmatch patterns on module fqns; empty = every Linear in the blocks", cli=False)
    exclude: list[str] = opt([], "fnmatch patterns on module fqns to leave dense", cli=False)
    method_options: dict[str, Any] = opt({}, "method options, e.g. {dampening: 0.05} for sparsegpt", cli=False)
    allocation_options: dict[str, Any] = opt({}, "allocation options, e.g. {M: 5, lam: 0.08} for owl; "
                                                 "min_sparsity / max_sparsity for every allocation", cli=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid methods: {', '.join(sorted(METHODS))}")
        pattern = parse_pattern(self.pattern)
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
            if isinstance(pattern, NM) and abs(self.sparsity - pattern.sparsity) > 1e-9:
                raise ValueError(f"pattern {pattern} fixes the sparsity at {pattern.sparsity:g}; drop --sparsity")
        check_common(self)
        if self.reconstruct_steps < 0:
            raise ValueError(f"reconstruct_steps must be >= 0, got {self.reconstruct_steps}")
        if self.reconstruct_target not in RECONSTRUCT_TARGETS:
            raise ValueError(f"unknown reconstruct_target {self.reconstruct_target!r}; valid: "
                             f"{', '.join(RECONSTRUCT_TARGETS)}")
        if not self.reconstruct_lr > 0:
            raise ValueError(f"reconstruct_lr must be > 0, got {self.reconstruct_lr}")
        for s in self.layer_sparsity.values():
            check_sparsity(s)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; valid allocations: {', '.join(ALLOCATIONS)}")
        if isinstance(pattern, NM) and self.allocation != "uniform":
            raise ValueError(f"allocation {self.allocation!r} varies the sparsity per layer, but pattern {pattern} "
                             f"fixes it; use --allocation uniform with N:M patterns")

    @property
    def effective_sparsity(self) -> float:
        pattern = parse_pattern(self.pattern)
        if isinstance(pattern, NM):
            return pattern.sparsity
        return 0.5 if self.sparsity is None else self.sparsity

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return config_from_dict(cls, d, "settings")


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``sparsecraft eval``."""

    model: str = shared("model")
    eval: str = shared("eval")
    eval_dataset: str | None = shared("eval_dataset")
    seqlen: int = shared("seqlen")
    eval_windows: int = shared("eval_windows")
    tasks: list[str] = shared("tasks")
    task_path: str | None = shared("task_path")
    task_limit: int | None = shared("task_limit")
    batch_size: int = opt(4, "windows per forward pass")
    seed: int = shared("seed")
    device: str = shared("device")
    dtype: str = shared("dtype")

    def __post_init__(self) -> None:
        check_common(self)
        if self.eval_windows < 1 and not self.tasks:
            raise ValueError(f"eval_windows must be >= 1, got {self.eval_windows} (0 skips perplexity only when "
                             f"--tasks gives something else to evaluate)")


@dataclass(frozen=True)
class SweepConfig:
    """Settings of ``sparsecraft sweep``."""

    model: str = shared("model")
    methods: list[str] = opt(["wanda", "sparsegpt"], "comma-separated methods")
    patterns: list[str] = opt(["unstructured", "2:4"], "comma-separated patterns")
    sparsities: str = opt("0.1:0.9:0.1", "comma-separated values or start:stop:step, inclusive")
    allocation: str = opt("uniform", "per-layer sparsity", choices=lambda: list(ALLOCATIONS))
    calib: str = shared("calib")
    eval: str = shared("eval")
    nsamples: int = shared("nsamples")
    seqlen: int = shared("seqlen")
    eval_windows: int = shared("eval_windows")
    eval_seqlen: int | None = opt(None, "tokens per evaluation window (default: seqlen)")
    sensitivity: bool = opt(False, "also prune one block at a time (per-block sensitivity)")
    sensitivity_sparsity: float = opt(0.7, "sparsity of the one pruned block")
    sensitivity_method: str = opt("wanda", "method of the sensitivity runs", choices=lambda: sorted(METHODS))
    batch_size: int = shared("batch_size")
    seed: int = shared("seed")
    device: str = shared("device")
    dtype: str = shared("dtype")

    def __post_init__(self) -> None:
        check_common(self)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown methods {bad}; valid methods: {', '.join(sorted(METHODS))}")
        for p in self.patterns:
            parse_pattern(p)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; valid allocations: {', '.join(ALLOCATIONS)}")
        check_sparsity(self.sensitivity_sparsity)


def field_of(cls: type, name: str) -> Field:
    return {f.name: f for f in fields(cls)}[name]


@dataclass(frozen=True)
class FinetuneRunConfig:
    """Settings of ``sparsecraft finetune`` (the output of ``prune`` is the positional input)."""

    pruned: str = opt("", "folder written by `sparsecraft prune` (HF checkpoint + masks.safetensors)")
    teacher: str = opt("", "dense teacher: HF id, folder or .gguf; '' = the model in the pruned run's "
                           "settings.json; 'none' = no distillation")
    calib: str = shared("calib")
    eval: str = shared("eval")
    steps: int = opt(100, "optimizer steps")
    batch_size: int = opt(4, "training windows per step")
    train_seqlen: int = opt(256, "tokens per training window")
    lr: float = opt(1e-4, "learning rate (AdamW, warm-up over the first tenth of the steps)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    distill_weight: float = opt(1.0, "weight of the SquareHead distillation loss")
    task_weight: float = opt(1.0, "weight of the next-token loss")
    train_embeddings: bool = opt(False, "also train the input embeddings (tied to the LM head in many models)")
    seqlen: int = shared("seqlen")
    eval_windows: int = shared("eval_windows")
    seed: int = shared("seed")
    device: str = shared("device")
    dtype: str = shared("dtype")

    def __post_init__(self) -> None:
        if not self.pruned:
            raise ValueError("pass the folder written by `sparsecraft prune` as the first argument")
        check_common(self)
        for name in ("steps", "train_seqlen"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


ACTIVATION_ALLOCATIONS = ("uniform", "greedy", "greedy-block")


def _threshold_rules() -> list[str]:
    return list(THRESHOLD_METHODS)


@dataclass(frozen=True)
class ActivationsConfig:
    """Settings of ``sparsecraft activations measure|calibrate|eval``."""

    action: str = opt("measure", "measure | calibrate | eval", choices=lambda: ["measure", "calibrate", "eval"])
    model: str = shared("model")
    calib: str = shared("calib")
    eval: str = shared("eval")
    nsamples: int = opt(16, "calibration windows (activation statistics converge fast)")
    seqlen: int = shared("seqlen")
    eval_windows: int = opt(8, "evaluation windows of seqlen tokens")
    batch_size: int = opt(4, "windows per forward pass")
    seed: int = shared("seed")
    device: str = shared("device")
    dtype: str = shared("dtype")
    method: str = opt("teal", "threshold rule", choices=_threshold_rules)
    sparsity: float = opt(0.5, "calibrate: model-wide activation sparsity target in [0, 1)")
    allocation: str = opt("uniform", "uniform | greedy (per layer, least block error, model-wide) | greedy-block "
                                     "(the greedy inside each block)", choices=lambda: list(ACTIVATION_ALLOCATIONS))
    cost_windows: int = opt(2, "greedy: calibration windows used for the layer costs")
    sparsities: str = opt("0.25,0.4,0.5,0.6", "eval: comma-separated model-wide targets")
    ppl_p: float | None = opt(None, "eval: also find the PPL-p% sparsity (the largest sparsity within p% of dense)")
    thresholds: str = opt("", "eval: a thresholds.safetensors written by calibrate")

    def __post_init__(self) -> None:
        check_common(self)
        check_sparsity(self.sparsity)
        for name in ("eval_windows", "cost_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.thresholds and not Path(self.thresholds).is_file():
            raise ValueError(f"thresholds file {self.thresholds} does not exist; write one with `sparsecraft "
                             f"activations calibrate --output DIR` (DIR/thresholds.safetensors)")
