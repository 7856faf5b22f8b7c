"""Every example in README.md and docs/*.md runs, so the documentation cannot drift from the code.

- ```python blocks are executed in order per file, on a tiny local model: model ids, the default corpus and window
  sizes are rewritten to tiny local ones (``rewrite_python``). Fragments may use the names a doc's prose says it
  assumes: ``model``, ``tok``, ``calib`` (token ids), ``windows`` (evaluation windows), ``masks`` (from a prune).
- ```bash blocks: every ``sparsecraft ...`` line runs through the CLI in order per file (outputs under a temporary
  folder, the tiny model and text substituted, sizes shrunk); ``python bench/... | recipes/...`` lines must name an
  existing script and only flags that script defines; ``make X`` lines must name a Makefile target.
- a doc's first ```yaml block is the settings file its commands read (``--settings NAME``).
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch

from helpers_cli import make_checkpoint, make_text
from sparsecraft.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:OMP_NUM_THREADS=\d+ )?(?:sparsecraft|python) [^`]+)`")
MODEL_IDS = re.compile(r"\"(HuggingFaceTB/[\w.-]+|default)\"")
SIZES = {"nsamples": 4, "seqlen": 16, "max_windows": 2, "eval_windows": 2, "batch_size": 2}
CLI_SIZES = {"--nsamples": "2", "--seqlen": "16", "--eval-windows": "2", "--steps": "2", "--train-seqlen": "16",
             "--batch-size": "2", "--eval-seqlen": "16"}


def fences(doc: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(doc.read_text(encoding="utf-8"))]


def docs_with(kind: str) -> list[Path]:
    return [d for d in DOCS if any(k == kind for k, _ in fences(d))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("docs")
    return {"model": make_checkpoint(root / "tiny"), "text": make_text(root / "text.txt", repeats=10), "root": root}


def rewrite_python(code: str, tiny: dict[str, Path]) -> str:
    code = MODEL_IDS.sub(repr(str(tiny["model"])), code)
    code = code.replace('"shakespeare"', repr(str(tiny["text"])))
    for name, value in SIZES.items():
        code = re.sub(rf"\b{name}=\d+", f"{name}={value}", code)
    return code


def python_namespace(tiny: dict[str, Path]) -> dict:
    import sparsecraft
    from sparsecraft import data

    model, tok = sparsecraft.load_model(str(tiny["model"]), "float32", "cpu")
    calib = data.calibration_data(tok, tiny["text"], nsamples=4, seqlen=16)
    windows = data.evaluation_data(tok, tiny["text"], seqlen=16, max_windows=2)
    return {"model": model, "tok": tok, "calib": calib, "windows": windows, "torch": torch}


@pytest.mark.parametrize("doc", docs_with("python"), ids=lambda d: d.name)
def test_python_examples_run(doc: Path, tiny, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write here
    namespace = python_namespace(tiny)
    for i, (kind, code) in enumerate(fences(doc)):
        if kind == "python":
            try:
                exec(compile(rewrite_python(code, tiny), f"{doc.name}[python block {i}]", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{doc.name}, python block {i} failed: {type(e).__name__}: {e}\n{code}") from e


def command_lines(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip()
            and not line.lstrip().startswith("#")]


def rewrite_cli(argv: list[str], tiny: dict[str, Path], root: Path) -> list[str]:
    """The documented command on the tiny model: real-model and corpus arguments swapped, outputs under ``root``."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--model":
            out += [arg, str(tiny["model"])]
            i += 2
        elif arg in ("--calib", "--eval"):
            out += [arg, str(tiny["text"])]
            i += 2
        elif arg in CLI_SIZES:
            out += [arg, CLI_SIZES[arg]]
            i += 2
        elif arg in ("--output", "--settings", "--thresholds") and value is not None:
            out += [arg, str(root / value)]
            i += 2
        elif arg.startswith("HuggingFaceTB/"):
            out.append(str(tiny["model"]))  # a positional model id
            i += 1
        elif not arg.startswith("-") and "/" in arg and not Path(arg).is_absolute():
            out.append(str(root / arg))  # a positional folder written by an earlier command (runs/...)
            i += 1
        else:
            out.append(arg)
            i += 1
    command = out[0] if out else ""
    flags = accepted_flags(command)
    defaults = {"--model": str(tiny["model"]), "--calib": str(tiny["text"]), "--eval": str(tiny["text"]),
                **CLI_SIZES, "--output": str(root / "runs" / command)}
    for flag, value in defaults.items():
        if flag in flags and flag not in out:
            out += [flag, value]
    return out


def accepted_flags(command: str) -> set[str]:
    from sparsecraft.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if command not in sub.choices:
        return set()
    return {o for action in sub.choices[command]._actions for o in action.option_strings}


def check_script(argv: list[str]) -> None:
    script = ROOT / argv[1]
    assert script.is_file(), f"documented script {argv[1]} does not exist"
    source = script.read_text()
    for arg in argv[2:]:
        if arg.startswith("--"):
            assert f'"{arg.split("=")[0]}"' in source, f"{argv[1]} does not define the documented flag {arg}"


@pytest.mark.parametrize("doc", docs_with("bash"), ids=lambda d: d.name)
def test_shell_examples_run(doc: Path, tiny, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    makefile = (ROOT / "Makefile").read_text()
    settings = [code for kind, code in fences(doc) if kind == "yaml"]  # the doc's settings-file example
    pending_yaml = settings[0] if settings else None
    for kind, code in fences(doc):
        if kind not in ("bash", "sh", ""):
            continue
        for line in command_lines(code):
            if kind == "" and not line.startswith(("sparsecraft ", "python ")):
                continue  # an unlabelled block (a tree, a table): only its commands are examples
            argv = shlex.split(line)
            while len(argv) > 1 and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                argv.pop(0)  # environment assignments before the command (OMP_NUM_THREADS=1 python ...)
            if argv[0] == "make":
                assert re.search(rf"^{argv[1]}:", makefile, re.M), f"{doc.name}: no Makefile target {argv[1]}"
                continue
            if argv[0] in ("python", "python3") and argv[1].startswith(("bench/", "recipes/")):
                check_script(argv)
                continue
            if argv[0] in ("pip", "torchrun", "git", "cd", "export"):
                continue  # installation and launcher lines: not sparsecraft's to run here
            assert argv[0] == "sparsecraft", f"{doc.name}: unexpected command in a bash example: {line}"
            if "--settings" in argv and pending_yaml is not None:
                (tmp_path / argv[argv.index("--settings") + 1]).write_text(pending_yaml)
            args = rewrite_cli(argv[1:], tiny, tmp_path)
            try:
                code_ = main(args + (["--no-progress"] if args and args[0] not in ("--help", "--version") else []))
            except SystemExit as e:  # --help / --version exit from argparse
                code_ = e.code
            expected = 2 if "--resume" in argv else 0  # resuming a finished run says there is nothing to resume
            assert code_ == expected, f"{doc.name}: `{line}` exited {code_} (ran as {args})"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_inline_commands_parse(doc: Path) -> None:
    """Commands quoted in prose (`sparsecraft ...`, `python bench/...`) at least parse with today's flags."""
    from sparsecraft.cli import build_parser

    parser = build_parser()
    for span in INLINE.findall(doc.read_text(encoding="utf-8")):
        argv = shlex.split(span)
        if argv[0].startswith("OMP_NUM_THREADS="):
            argv = argv[1:]
        if argv[0] == "python":
            if len(argv) > 1 and argv[1].startswith(("bench/", "recipes/")):
                check_script(argv)
            continue
        if any(a.isupper() or a.startswith("[") or a in ("...", "X") for a in argv):
            continue  # a synopsis with placeholders (PRUNED_DIR, ...): flags are checked where it runs
        if len(argv) == 2:  # a command named in prose
            assert accepted_flags(argv[1]), f"{doc.name}: `{span}` names no sparsecraft command"
            continue
        try:
            parser.parse_args(argv[1:])
        except SystemExit as e:
            raise AssertionError(f"{doc.name}: `{span}` does not parse (exit {e.code})") from None
