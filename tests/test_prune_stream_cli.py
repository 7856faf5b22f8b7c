"""`sparsecraft prune` of a local safetensors folder streams by default: the same output folder as the in-memory
path (`--no-stream`), bit for bit; resumable after a kill during the prune or after it; data-parallel under torchrun
(2 gloo ranks equal 1 process for wanda, rank 0 writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file

from helpers_cli import TEXT, char_tokenizer, make_text
from sparsecraft.checkpoint import load_masks, load_packed_state_dict
from sparsecraft.cli import main
from sparsecraft.commands import prune as prune_command
from sparsecraft.commands import prune_streamed
from sparsecraft.config import RunConfig
from sparsecraft.engine import stream


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A 3-block Llama with tied embeddings, saved in several shards, with a character tokenizer."""
    root = tmp_path_factory.mktemp("stream_cli")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "tiny", max_shard_size="20KB")
    char_tokenizer(TEXT).save_pretrained(root / "tiny")
    assert len(json.loads((root / "tiny/model.safetensors.index.json").read_text())["weight_map"]) > 0
    return {"model": root / "tiny", "text": make_text(root / "text.txt"), "root": root}


def args(assets, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(assets["model"]), "--calib", str(assets["text"]), "--eval", str(assets["text"]),
            "--nsamples", "6", "--seqlen", "32", "--eval-windows", "3", "--batch-size", "2", "--output", str(out),
            "--no-progress", *extra]


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def packed_meta(out: Path) -> dict:
    with safe_open(str(out / "sparse/model.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["sparsecraft"])


def assert_same_outputs(a: Path, b: Path, exact_errors: bool = True) -> None:
    """Weights, masks and the packed file equal bit for bit; the same files; the same perplexities."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = load_masks(a / "masks.safetensors"), load_masks(b / "masks.safetensors")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    pa, pb = load_packed_state_dict(a / "sparse"), load_packed_state_dict(b / "sparse")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert packed_meta(a) == packed_meta(b)  # same packed layouts, aliases and per-tensor checksums
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(a) == files(b)
    ra, rb = report_of(a), report_of(b)
    assert ra["perplexity"] == rb["perplexity"] and ra["parameters"] == rb["parameters"]
    assert ra["sparsity"] == rb["sparsity"] and ra["layers"].keys() == rb["layers"].keys()
    errors = [({k: v["error"] for k, v in r["layers"].items()}) for r in (ra, rb)]
    assert errors[0] == (errors[1] if exact_errors else pytest.approx(errors[1], rel=1e-5))


@pytest.fixture(scope="module")
def streamed(assets) -> Path:
    out = assets["root"] / "streamed"
    assert main(args(assets, out, "--method", "sparsegpt")) == 0
    return out


def test_streaming_is_the_default_and_equals_the_in_memory_prune(assets, streamed, tmp_path, monkeypatch):
    report = report_of(streamed)
    assert report["streaming"]["used"] is True and report["streaming"]["world_size"] == 1
    assert report["streaming"]["peak_rss"] == report["prune_memory_bytes"]["peak_rss"] > 0
    assert "Streamed: one block in memory at a time" in (streamed / "report.md").read_text()
    assert report["sparsity"]["overall_pruned_layers"] == 0.5 and len(report["layers"]) == 21
    assert packed_meta(streamed)["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert not (streamed.parent / ".streamed.partial").exists()
    assert not (streamed.parent / ".streamed.staging").exists()
    # --no-stream loads the model whole and writes the same folder
    whole = tmp_path / "whole"
    assert main(args(assets, whole, "--method", "sparsegpt", "--no-stream")) == 0
    assert "streaming" not in report_of(whole)
    assert_same_outputs(streamed, whole, exact_errors=False)  # errors: float sums over other batch groupings
    # the streamed path never loads the whole model
    monkeypatch.setattr(prune_command, "load_model", lambda *a, **k: pytest.fail("the whole model was loaded"))
    again = tmp_path / "again"
    assert main(args(assets, again, "--method", "sparsegpt")) == 0
    assert_same_outputs(streamed, again)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(again)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_resume_after_a_kill_during_the_prune_equals_uninterrupted(assets, streamed, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    original = stream._Progress.write
    finished = []

    def write_then_die(self, last_block, result, seconds):
        original(self, last_block, result, seconds)
        finished.append(last_block)
        if last_block == 0:
            raise KeyboardInterrupt  # a kill right after block 0 was committed

    monkeypatch.setattr(stream._Progress, "write", write_then_die)
    assert main(args(assets, out, "--method", "sparsegpt")) == 130
    assert not out.exists() and (tmp_path / ".resumed.partial" / "progress.json").is_file()
    assert main(args(assets, out, "--method", "sparsegpt")) == 2  # an unfinished run, no --resume
    assert main(args(assets, out, "--method", "sparsegpt", "--seed", "3", "--resume")) == 2  # other settings
    finished.clear()
    assert main(args(assets, out, "--method", "sparsegpt", "--resume")) == 0
    assert finished == [1, 2]  # block 0 was not redone
    assert_same_outputs(streamed, out)
    assert not (tmp_path / ".resumed.partial").exists()


def test_resume_after_a_kill_while_writing_reuses_the_pruned_checkpoint(assets, streamed, tmp_path, monkeypatch):
    out = tmp_path / "late"

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prune_streamed, "save_packed_streaming", die)
    assert main(args(assets, out, "--method", "sparsegpt")) == 130
    monkeypatch.undo()
    monkeypatch.setattr(prune_streamed, "prune_streaming", lambda *a, **k: pytest.fail("pruned again"))
    assert main(args(assets, out, "--method", "sparsegpt", "--resume")) == 0
    assert_same_outputs(streamed, out)


def test_torchrun_refuses_a_model_it_cannot_stream(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(args(assets, tmp_path / "o", "--no-stream")) == 2
    assert "distributed pruning (torchrun, WORLD_SIZE=2) streams a local safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()
    cfg = RunConfig(model=str(assets["model"]))  # streamable, but the caller needs the whole model (lm-eval tasks)
    with pytest.raises(ValueError, match="WORLD_SIZE=2.*but --tasks needs the whole model"):
        prune_streamed.use_streaming(cfg, False, "--tasks needs the whole model")
    monkeypatch.delenv("WORLD_SIZE")
    assert prune_streamed.use_streaming(cfg, False) and not prune_streamed.use_streaming(cfg, False, "--tasks")


def test_two_torchrun_ranks_equal_one_process(assets, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(prune_streamed.__file__).parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "sparsecraft", *args(assets, tmp_path / "two", "--method", "wanda")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("perplexity") == 1  # one table: rank 0 reports, rank 1 exits quietly
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same block outputs per batch
    try:
        assert main(args(assets, tmp_path / "one", "--method", "wanda")) == 0
    finally:
        torch.set_num_threads(threads)
    assert_same_outputs(tmp_path / "one", tmp_path / "two")  # wanda: input norms summed in the same order, exact
    two = report_of(tmp_path / "two")["streaming"]
    assert two["world_size"] == 2 and len(two["peak_rss_per_rank"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no leftovers of either rank


def test_eval_streams_a_safetensors_folder_with_the_in_memory_number(assets, streamed, monkeypatch, capsys):
    from sparsecraft.commands import eval as eval_command

    argv = ["eval", str(streamed), "--eval", str(assets["text"]), "--seqlen", "32", "--eval-windows", "3",
            "--no-progress"]
    assert main(argv + ["--no-stream"]) == 0
    whole = capsys.readouterr().out
    monkeypatch.setattr(eval_command, "load_model", lambda *a, **k: pytest.fail("the whole model was loaded"))
    assert main(argv) == 0
    assert capsys.readouterr().out == whole
    assert whole.startswith(f"perplexity {report_of(streamed)['perplexity']['sparse']:.3f} on 3 windows")


def test_a_hub_id_streams_from_its_downloaded_snapshot(assets, streamed, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from sparsecraft import models

    calls = []

    def download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(assets["model"])  # what the hub cache would hold after the download

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setattr(prune_command, "load_model", lambda *a, **k: pytest.fail("the whole model was loaded"))
    argv = args(assets, tmp_path / "hub", "--method", "sparsegpt")
    argv[argv.index("--model") + 1] = "someorg/tiny-llama"
    assert main(argv) == 0
    assert calls == [("someorg/tiny-llama", models.HUB_FILES)]
    assert report_of(tmp_path / "hub")["streaming"]["used"] is True
    assert_same_outputs(streamed, tmp_path / "hub")
    # `eval` streams a hub id the same way: the same perplexity as the local folder
    text = str(assets["text"])
    capsys.readouterr()
    assert main(["eval", "someorg/tiny-llama", "--eval", text, "--eval-windows", "2", "--seqlen", "32"]) == 0
    assert main(["eval", str(assets["model"]), "--eval", text, "--eval-windows", "2", "--seqlen", "32"]) == 0
    hub_line, local_line = [ln for ln in capsys.readouterr().out.splitlines() if " windows of " in ln]
    assert hub_line == local_line
    # a failed download is a clear error before anything is written
    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    argv[argv.index("--output") + 1] = str(tmp_path / "never")
    assert main(argv) == 2
    assert "could not download someorg/tiny-llama" in capsys.readouterr().err
    assert not (tmp_path / "never").exists() and not (tmp_path / ".never.partial").exists()
