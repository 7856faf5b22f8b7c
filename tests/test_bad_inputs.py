"""The bad-input catalogue: every subcommand, many wrong inputs. For each: a non-zero exit, exactly ONE line on
stderr, no traceback, and every input and pre-existing output byte-for-byte unchanged (no folder created either)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from helpers_cli import make_checkpoint, make_text
from sparsecraft.cli import main


def tree_digest(path: Path) -> str:
    """sha256 over every file (relative name + bytes) below ``path`` (or of the file itself)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for f in sorted(p for p in path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, texts, settings files, a finished prune output, a foreign folder and a pruned checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    w = {"root": root, "model": make_checkpoint(root / "models" / "tiny"), "text": make_text(root / "text.txt")}
    w["empty"] = root / "empty.txt"
    w["empty"].write_text("")
    w["binary"] = root / "binary.txt"
    w["binary"].write_bytes(b"\xff\xfe\x00\x81" * 50)
    w["short"] = root / "short.txt"
    w["short"].write_text("too short")
    (root / "emptydir").mkdir()
    w["emptydir"] = root / "emptydir"
    w["corrupt"] = root / "corrupt"
    w["corrupt"].mkdir()
    (w["corrupt"] / "config.json").write_text((w["model"] / "config.json").read_text())
    (w["corrupt"] / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    w["noconfig"] = root / "noconfig"
    w["noconfig"].mkdir()
    (w["noconfig"] / "model.safetensors").write_bytes(b"x")
    w["foreign"] = root / "foreign"
    w["foreign"].mkdir()
    (w["foreign"] / "thesis.tex").write_text("years of work")
    for name, body in {"bad.yaml": "method: [unclosed", "list.yaml": "- a\n- b\n",
                       "nsamples_str.yaml": "nsamples: '4'\n", "seqlen_float.yaml": "seqlen: 32.7\n",
                       "layers_list.yaml": "layer_sparsity: [1, 2]\n", "seed_float.yaml": "seed: 1.5\n",
                       "unknown.yaml": "nsamplez: 4\n", "include_dict.yaml": "include: {a: 1}\n",
                       "layer_high.yaml": "layer_sparsity: {model.layers.0.mlp.up_proj: 1.5}\n",
                       "layer_unknown.yaml": "layer_sparsity: {lm_head: 0.5}\n",
                       "method_opt.yaml": "method: sparsegpt\nmethod_options: {dampnig: 0.1}\n",
                       "owl24.yaml": "allocation: owl\npattern: '2:4'\n", "bad.json": "{\"method\": ",
                       "sparsity_str.yaml": "sparsity: half\n", "bool_int.yaml": "nsamples: true\n"}.items():
        (root / name).write_text(body)
        w[name] = root / name
    w["good_out"] = root / "runs" / "good"
    common = ["--model", str(w["model"]), "--calib", str(w["text"]), "--eval", str(w["text"]), "--nsamples", "2",
              "--seqlen", "16", "--eval-windows", "1", "-q"]
    assert main(["prune", *common, "--output", str(w["good_out"])]) == 0
    w["pruned"] = w["good_out"]
    return w


def prune(w: dict[str, Path], *extra: str, output: str | None = None) -> list[str]:
    out = output if output is not None else str(w["root"] / "runs" / "new")
    return ["prune", "--model", str(w["model"]), "--calib", str(w["text"]), "--eval", str(w["text"]), "--nsamples",
            "2", "--seqlen", "16", "--eval-windows", "1", "--output", out, *extra]


def cases(w: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    """(id, argv, a piece of the expected message)."""
    r = w["root"]
    c: list[tuple[str, list[str], str]] = []
    # --- prune: settings by flag
    for flag, value, msg in [
        ("--nsamples", "x", "invalid int"), ("--nsamples", "0", "nsamples must be >= 1"),
        ("--nsamples", "-3", "nsamples must be >= 1"), ("--nsamples", "2.5", "invalid int"),
        ("--seqlen", "1", "seqlen must be >= 2"), ("--seqlen", "1.5", "invalid int"),
        ("--seqlen", "100", "longer than the model's context"), ("--seqlen", "0", "seqlen must be >= 1"),
        ("--eval-windows", "-1", "eval_windows must be >= 0"), ("--batch-size", "0", "batch_size must be >= 1"),
        ("--seed", "x", "invalid int"), ("--sparsity", "1", "sparsity must be in [0, 1)"),
        ("--sparsity", "-0.1", "sparsity must be in [0, 1)"), ("--sparsity", "x", "invalid float"),
        ("--sparsity", "nan", "in [0, 1)"), ("--sparsity", "inf", "in [0, 1)"),
        ("--pattern", "5:4", "invalid N:M pattern"), ("--pattern", "0:4", "N:M"), ("--pattern", "2:0", "N:M"),
        ("--pattern", "abc", "pattern"), ("--pattern", "4x0", "block"), ("--pattern", "3x3", "3x3"),
        ("--pattern", "2:3", "2:3"), ("--method", "obs", "invalid choice"), ("--method", "", "invalid choice"),
        ("--allocation", "greedy", "invalid choice"), ("--dtype", "int8", "unknown dtype"),
        ("--dtype", "float64x", "unknown dtype"), ("--device", "cuda", "no CUDA"),
        ("--device", "cuda:7", "no CUDA"), ("--device", "tpu", "device"), ("--device", "meta", "not supported"),
        ("--dampening", "-1", "dampening"), ("--dampening", "x", "invalid float"),
        ("--reconstruct-steps", "-1", "reconstruct_steps must be >= 0"), ("--nsamples", "", "invalid int"),
        ("--reconstruct-target", "global", "invalid choice"), ("--reconstruct-lr", "0", "reconstruct_lr must be > 0"),
    ]:
        c.append((f"prune{flag}={value}", prune(w, flag, value), msg))
    c.append(("prune-sparsity-with-2:4", prune(w, "--pattern", "2:4", "--sparsity", "0.3"), "fixes the sparsity"))
    c.append(("prune-owl-2:4", prune(w, "--pattern", "2:4", "--allocation", "owl"), "uniform"))
    c.append(("prune-unknown-flag", prune(w, "--nsample", "3"), "unrecognized arguments"))
    # --- prune: inputs
    for name, argv, msg in [
        ("model-missing", ["--model", str(r / "nope")], "does not exist"),
        ("model-textfile", ["--model", str(w["text"])], "does not exist or is not a directory"),
        ("model-corrupt", ["--model", str(w["corrupt"])], "could not load model"),
        ("model-noconfig", ["--model", str(w["noconfig"])], "no config.json"),
        ("model-gguf-missing", ["--model", str(r / "m.gguf")], "does not exist"),
        ("model-bare-name", ["--model", "smollm3"], "not a local path"),
        ("calib-missing", ["--calib", str(r / "none.txt")], "does not exist"),
        ("calib-empty", ["--calib", str(w["empty"])], "is empty"),
        ("calib-binary", ["--calib", str(w["binary"])], "UTF-8"),
        ("calib-emptydir", ["--calib", str(w["emptydir"])], "no .txt files"),
        ("calib-short", ["--calib", str(w["short"])], "too few"),
        ("eval-missing", ["--eval", str(r / "none.txt")], "does not exist"),
        ("eval-empty", ["--eval", str(w["empty"])], "is empty"),
        ("eval-short", ["--eval", str(w["short"])], "too few"),
    ]:
        c.append((f"prune-{name}", prune(w) + argv, msg))
    for name, msg in [("bad.yaml", "cannot parse"), ("list.yaml", "mapping"), ("nsamples_str.yaml", "'nsamples'"),
                      ("seqlen_float.yaml", "'seqlen' must be int"), ("layers_list.yaml", "'layer_sparsity'"),
                      ("seed_float.yaml", "'seed' must be int"), ("unknown.yaml", "nsamplez"),
                      ("include_dict.yaml", "'include'"), ("layer_high.yaml", "sparsity must be in [0, 1)"),
                      ("layer_unknown.yaml", "not prunable targets"), ("method_opt.yaml", "dampnig"),
                      ("owl24.yaml", "uniform"), ("bad.json", "cannot parse"), ("sparsity_str.yaml", "'sparsity'"),
                      ("bool_int.yaml", "'nsamples' must be int")]:
        c.append((f"prune-settings-{name}", prune(w, "--settings", str(w[name])), msg))
    c.append(("prune-settings-missing", prune(w, "--settings", str(r / "none.yaml")), "does not exist"))
    # --- prune: outputs that must never be touched
    for name, out, extra, msg in [
        ("output=model", str(w["model"]), ["--overwrite"], "overlaps the input"),
        ("output=model-parent", str(w["model"].parent), ["--overwrite"], "overlaps the input"),
        ("output-inside-model", str(w["model"] / "pruned"), ["--overwrite"], "overlaps the input"),
        ("output=text", str(w["text"]), ["--overwrite"], "overlaps the input"),
        ("output=cwd", ".", ["--overwrite"], "current directory"),
        ("output=parent", "..", ["--overwrite"], "current directory"),
        ("output=root", "/", ["--overwrite"], "current directory"),
        ("output=foreign", str(w["foreign"]), ["--overwrite"], "not written by sparsecraft"),
        ("output=existing", str(w["good_out"]), [], "pass --overwrite"),
        ("output=file", str(w["binary"]), [], "is a file"),
        ("output=settings", str(w["bad.yaml"].parent), ["--settings", str(w["unknown.yaml"])], "unknown settings"),
        ("resume-nothing", str(r / "runs" / "fresh"), ["--resume"], "nothing to resume"),
    ]:
        c.append((f"prune-{name}", prune(w, *extra, output=out), msg))
    # --- eval
    ev = ["eval", str(w["model"]), "--eval", str(w["text"]), "--seqlen", "16"]
    for name, extra, msg in [
        ("windows0", ["--eval-windows", "0"], "eval_windows must be >= 1"), ("seqlen", ["--seqlen", "100"], "context"),
        ("text-missing", ["--eval", str(r / "no.txt")], "does not exist"), ("dtype", ["--dtype", "x"], "dtype"),
        ("device", ["--device", "cuda"], "no CUDA"), ("flag", ["--windows", "2"], "unrecognized"),
        ("batch0", ["--batch-size", "0"], "batch_size must be >= 1"), ("text-binary", ["--eval", str(w["binary"])],
                                                                       "UTF-8"),
    ]:
        c.append((f"eval-{name}", ev + extra, msg))
    c.append(("eval-model-missing", ["eval", str(r / "nope"), "--eval", str(w["text"])], "does not exist"))
    c.append(("eval-model-corrupt", ["eval", str(w["corrupt"]), "--eval", str(w["text"])], "could not load"))
    # --- inspect
    for name, path, msg in [("missing", r / "nope", "does not exist"), ("text", w["text"], ""),
                            ("corrupt", w["corrupt"] / "model.safetensors", "corrupt"),
                            ("emptydir", w["emptydir"], ""), ("foreign", w["foreign"], "")]:
        c.append((f"inspect-{name}", ["inspect", str(path)], msg))
    # --- finetune
    ft = ["finetune", str(w["pruned"]), "--calib", str(w["text"]), "--eval", str(w["text"]), "--steps", "1",
          "--train-seqlen", "16", "--seqlen", "16", "--eval-windows", "1", "--teacher", "none"]
    for name, extra, msg in [
        ("steps0", ["--steps", "0"], "steps must be >= 1"), ("lr0", ["--lr", "0"], "lr must be > 0"),
        ("lr-x", ["--lr", "x"], "invalid float"), ("output=pruned", ["--output", str(w["pruned"]), "--overwrite"],
                                                   "overlaps the input"),
        ("output-inside", ["--output", str(w["pruned"] / "ft"), "--overwrite"], "overlaps the input"),
        ("output=cwd", ["--output", ".", "--overwrite"], "current directory"),
        ("teacher-missing", ["--teacher", str(r / "nope")], "does not exist"),
        ("calib-missing", ["--calib", str(r / "nope.txt")], "does not exist"),
        ("seqlen", ["--seqlen", "100"], "context"), ("dtype", ["--dtype", "x"], "dtype"),
    ]:
        c.append((f"finetune-{name}", ft + ["--output", str(r / "runs" / "ft")] + extra, msg))
    c.append(("finetune-no-masks", ["finetune", str(w["model"]), "--output", str(r / "runs" / "ft2")],
              "no masks.safetensors"))
    c.append(("finetune-missing", ["finetune", str(r / "nope"), "--output", str(r / "runs" / "ft3")],
              "no masks.safetensors"))
    # --- sweep
    sw = ["sweep", "--model", str(w["model"]), "--calib", str(w["text"]), "--eval", str(w["text"]), "--nsamples",
          "2", "--seqlen", "16", "--eval-windows", "1", "--output", str(r / "runs" / "sw")]
    for name, extra, msg in [
        ("methods", ["--methods", "obs"], "unknown methods"), ("patterns", ["--patterns", "5:4"], "N:M"),
        ("sparsities-x", ["--sparsities", "x"], "comma-separated"), ("sparsities-high", ["--sparsities", "1.5"],
                                                                    "[0, 1)"),
        ("sparsities-empty", ["--sparsities", ","], "empty"), ("allocation", ["--allocation", "x"], "invalid choice"),
        ("sens-sparsity", ["--sensitivity-sparsity", "2"], "[0, 1)"),
        ("output=model", ["--output", str(w["model"]), "--overwrite"], "overlaps the input"),
        ("output=foreign", ["--output", str(w["foreign"]), "--overwrite"], "not written by sparsecraft"),
        ("methods-empty", ["--methods", ","], "unknown methods"),
    ]:
        c.append((f"sweep-{name}", sw + extra, msg))
    # --- activations
    ac = ["activations", "calibrate", "--model", str(w["model"]), "--calib", str(w["text"]), "--eval",
          str(w["text"]), "--nsamples", "2", "--seqlen", "16", "--eval-windows", "1", "--output",
          str(r / "runs" / "act")]
    for name, extra, msg in [
        ("method", ["--method", "relu"], "invalid choice"), ("sparsity", ["--sparsity", "1.5"], "[0, 1)"),
        ("allocation", ["--allocation", "owl"], "invalid choice"), ("cost", ["--cost-windows", "0"], "cost_windows"),
        ("thresholds", ["--thresholds", str(r / "none.safetensors")], "does not exist"),
        ("output=text", ["--output", str(w["text"]), "--overwrite"], "overlaps the input"),
    ]:
        c.append((f"activations-{name}", ac + extra, msg))
    c.append(("activations-action", ["activations", "explode"], "invalid choice"))
    # --- pack
    for name, argv, msg in [
        ("missing", ["pack", str(r / "nope"), "--output", str(r / "runs" / "pk")], "does not exist"),
        ("no-masks", ["pack", str(w["model"]), "--output", str(r / "runs" / "pk")], "masks"),
        ("output=input", ["pack", str(w["pruned"]), "--output", str(w["pruned"]), "--overwrite"], "overlaps"),
        ("output=parent", ["pack", str(w["pruned"]), "--output", str(w["pruned"].parent), "--overwrite"],
         "current directory"),  # the runs folder is the working directory here
        ("output=model-folder", ["pack", str(w["pruned"]), "--output", str(w["model"].parent), "--overwrite"],
         "not written by sparsecraft"),
        ("output=foreign", ["pack", str(w["pruned"]), "--output", str(w["foreign"]), "--overwrite"],
         "not written by sparsecraft"),
    ]:
        c.append((f"pack-{name}", argv, msg))
    # --- top level
    c.append(("unknown-command", ["explode"], "invalid choice"))
    return c


def snapshot(w: dict[str, Path]) -> dict[str, str]:
    return {"root-listing": json.dumps(sorted(str(p.relative_to(w["root"])) for p in w["root"].rglob("*"))),
            **{k: tree_digest(v) for k, v in w.items() if k != "root" and v.exists()}}


def test_catalogue(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(world["root"] / "runs")  # "." and ".." are the runs folder and the world's root
    all_cases = cases(world)
    assert len(all_cases) >= 120, len(all_cases)
    before = snapshot(world)
    failures = []
    for name, argv, message in all_cases:
        try:
            code = main([*argv, "-q"])
        except SystemExit as e:  # argparse refuses before main's boundary
            code = e.code
        err = capsys.readouterr().err.strip()
        lines = err.splitlines()
        if code in (0, None) or len(lines) != 1 or "Traceback" in err or message not in err:
            failures.append(f"{name}: exit {code}, stderr {err[-400:]!r}")
    after = snapshot(world)
    changed = [k for k in before if before[k] != after.get(k)]
    assert not failures, "\n".join(failures)
    assert not changed, f"inputs or outputs changed: {changed}"
