"""Build a command's flags from its typed config (sparsecraft.config), and the config back from the flags.

A field ``eval_windows`` becomes ``--eval-windows``; its help and default come from the dataclass; ``choices``
metadata (a callable, so registries are read when the parser is built) lists the valid values. Flags default to
"not given", so that settings files can sit between the dataclass defaults and the flags: flags > file > defaults.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from sparsecraft.config import check_settings, config_from_dict

C = TypeVar("C")


def _scalar(kind: Any) -> Any:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) else kind


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (fields with ``cli=False`` metadata are settings-file only)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind = _scalar(hints[f.name])
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(kind) is list:
            kwargs.update(type=_comma_list, metavar="A,B,...")
        else:
            kwargs["type"] = kind
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]()
        if f.name in positional:
            kwargs.pop("help")
            parser.add_argument(f.name, nargs="?", help=help_text, **kwargs)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def config_from_args(cls: type[C], args: argparse.Namespace, base: dict[str, Any] | None = None) -> C:
    """``base`` settings (e.g. from a settings file) overridden by every flag that was given; the file's values are
    checked on their own too (a wrong type in a file is an error even where a flag overrides it)."""
    settings = check_settings(cls, dict(base or {}), "settings in the file")
    for f in fields(cls):  # type: ignore[arg-type]
        if hasattr(args, f.name):
            settings[f.name] = getattr(args, f.name)
    return config_from_dict(cls, settings)


def add_output_arguments(parser: argparse.ArgumentParser, default: str, resume: bool = False) -> None:
    """--output / --overwrite (and --resume): how a command writes, not what it computes (not a setting)."""
    parser.add_argument("--output", default=default, help=f"output folder (default: {default})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder written by sparsecraft (never anything else)")
    if resume:
        parser.add_argument("--resume", action="store_true", help="continue an interrupted run into --output")
