"""The ``sparsecraft`` command: one subcommand per module in sparsecraft.commands, named after it.

The error boundary lives here: every expected failure (bad input, unreadable file, unusable device, full disk, closed
pipe) ends as ONE line on stderr and a non-zero exit; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import typing

from sparsecraft import __version__

# Each module exposes register(subparsers) and sets func=run(args) -> int. Optional ones may be absent.
COMMANDS = ["prune", "eval", "inspect", "pack", "bench", "finetune", "sweep", "activations", "shrink", "kv", "moe"]

log = logging.getLogger("sparsecraft")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the usage block too) that point to --help, and no
    abbreviated flags (``--nsample 3`` must not silently mean ``--nsamples 3``)."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_common(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v/-q/--debug/--no-progress, accepted before or after the subcommand."""
    default = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="count", help="more log output", **({"default": 0} if top else
                                                                                       default))
    parser.add_argument("-q", "--quiet", action="store_true", help="only results and errors; no progress bars",
                        **default)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error", **default)
    parser.add_argument("--no-progress", action="store_true", dest="no_progress", help="hide progress bars",
                        **default)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sparsecraft", description="Neural-network sparsity for PyTorch and "
                                     "Hugging Face: prune, evaluate, pack and benchmark sparse models.")
    parser.add_argument("--version", action="version", version=f"sparsecraft {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"sparsecraft.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"sparsecraft.commands.{name}":
                continue
            raise
        module.register(sub)
    for child in sub.choices.values():
        _add_common(child, top=False)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    args.progress = not (args.quiet or args.no_progress)
    if not args.progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args)
    name = f"sparsecraft {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; nothing complete was written. For prune, rerun with --resume to continue "
              f"from the last finished block.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `sparsecraft inspect X | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        print(f"{name}: output pipe closed", file=sys.stderr)
        return 141
    except Exception as e:  # the one error boundary
        if args.debug:
            raise
        if isinstance(e, ValueError):
            print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        if isinstance(e, OSError):
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            print(f"{name}: error: {e.strerror or _one_line(e)}{where}", file=sys.stderr)
            return 1
        print(f"{name}: error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
