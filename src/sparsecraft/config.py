"""The settings of one prune run: a frozen dataclass, validated, round-tripping to JSON/YAML (the "plan" file)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from sparsecraft.allocation import ALLOCATIONS
from sparsecraft.methods import METHODS
from sparsecraft.models import DTYPES
from sparsecraft.patterns import NM, check_sparsity, parse_pattern


@dataclass(frozen=True)
class RunConfig:
    model: str = "default"  # a Hugging Face id, a local HF directory, a .gguf file, or "default" (SmolLM2-135M)
    method: str = "wanda"  # magnitude | random | wanda | sparsegpt
    sparsity: float | None = None  # fraction of zeros; None = 0.5, or what an N:M pattern fixes
    pattern: str = "unstructured"  # "unstructured", "2:4", "4:8", "4x4", ...
    calib: str = "shakespeare"  # text file, folder of .txt, or "shakespeare" (default corpus, calibration works)
    eval: str = "shakespeare"  # same; "shakespeare" = held-out works (Hamlet, Macbeth, Othello)
    nsamples: int = 64  # calibration windows
    seqlen: int = 512  # tokens per window (calibration and evaluation)
    eval_windows: int = 16  # evaluation windows (0 = skip perplexity)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8  # calibration windows per forward pass
    layers: dict[str, float] = field(default_factory=dict)  # per-layer sparsity by module fqn
    include: list[str] = field(default_factory=list)  # fnmatch patterns on fqns; empty = all block Linears
    exclude: list[str] = field(default_factory=list)
    method_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"dampening": 0.05} for sparsegpt
    allocation: str = "uniform"  # per-layer sparsity plan: uniform | erk | owl | search (sparsecraft.allocation)
    allocation_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"M": 5, "lam": 0.08} for owl;
    # also "min_sparsity" / "max_sparsity" (per-layer bounds) for every allocation

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid methods: {', '.join(sorted(METHODS))}")
        pattern = parse_pattern(self.pattern)
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
            if isinstance(pattern, NM) and abs(self.sparsity - pattern.sparsity) > 1e-9:
                raise ValueError(f"pattern {pattern} fixes the sparsity at {pattern.sparsity:g}; drop --sparsity")
        for name in ("nsamples", "seqlen", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be >= 2, got {self.seqlen}")
        if self.eval_windows < 0:
            raise ValueError(f"eval_windows must be >= 0, got {self.eval_windows}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        for fqn, s in self.layers.items():
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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown settings {unknown} in plan; valid keys: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"bad plan: {e}") from None


def read_plan(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON plan file -> dict of settings (validated later by RunConfig)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"plan file {path} does not exist; pass a YAML or JSON file")
    try:
        data = yaml.safe_load(p.read_text()) if p.suffix in (".yaml", ".yml") else json.loads(p.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot parse plan file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"plan file {path} must hold a mapping of settings, e.g. 'method: wanda'")
    return data
