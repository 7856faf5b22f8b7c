"""The ``sparsecraft`` command: one subcommand per module in sparsecraft.commands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes register(subparsers) and sets func=run(args) -> int. Optional ones may be absent.
COMMANDS = ["prune", "evaluate", "inspect", "pack", "bench", "train", "sweep", "activations"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsecraft", description="Neural-network sparsity for PyTorch and "
                                     "Hugging Face: prune, evaluate, pack and benchmark sparse models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"sparsecraft.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"sparsecraft.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"sparsecraft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsecraft {args.command}: interrupted; nothing complete was written. For prune, rerun with "
              f"--resume to continue from the last finished block.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
