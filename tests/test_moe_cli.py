"""`sparsecraft moe prune|merge|moefy` on tiny local checkpoints: outputs load, reports say what happened."""

import json

import pytest
import torch

from helpers_cli import TEXT, char_tokenizer, make_checkpoint, make_text
from test_moe_models import tiny_moe
from sparsecraft.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_cli")
    moe = root / "mixtral"
    tiny_moe("mixtral").save_pretrained(moe)
    char_tokenizer(TEXT).save_pretrained(moe)
    return {"moe": moe, "dense": make_checkpoint(root / "llama"), "text": make_text(root / "text.txt", repeats=10)}


def _run(*argv: str) -> int:
    return main([*argv, "--nsamples", "4", "--seqlen", "16", "--eval-windows", "2", "--no-progress"])


@pytest.mark.parametrize("action", ["prune", "merge"])
def test_expert_actions_write_a_plain_checkpoint(action, files, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / action
    assert _run("moe", action, str(files["moe"]), "--keep", "3", "--calib", str(files["text"]), "--eval",
                str(files["text"]), "--output", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["action"] == action and report["kept"] == 3 and report["num_experts"] == 4
    assert report["params"] < report["params_before"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 3 and model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 3


def test_moefy_writes_a_loadable_moe(files, tmp_path):
    from sparsecraft.modules.moe_mlp import MoEMLP
    from sparsecraft.moe import load_moefied

    out = tmp_path / "moefy"
    assert _run("moe", "moefy", str(files["dense"]), "--experts", "4", "--top-k", "1", "--shared", "1", "--calib",
                str(files["text"]), "--eval", str(files["text"]), "--output", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["active_fraction"] == 0.5 and report["layers"] == 2
    model, _ = load_moefied(out)
    moes = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert len(moes) == 2 and all(m.top_k == 1 and m.num_experts == 3 and m.shared_down.shape == (32, 16)
                                  for m in moes)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_moefy_refit_changes_only_the_down_projections(files, tmp_path, capsys):
    from sparsecraft.moe import load_moefied

    common = ["--experts", "4", "--top-k", "1", "--shared", "1", "--calib", str(files["text"]), "--eval",
              str(files["text"])]
    assert _run("moe", "moefy", str(files["dense"]), *common, "--output", str(tmp_path / "plain")) == 0
    assert _run("moe", "moefy", str(files["dense"]), *common, "--refit", "0.3", "--output", str(tmp_path / "refit")) == 0
    errors = json.loads((tmp_path / "refit" / "report.json").read_text())["refit_error_before_after"]
    assert len(errors) == 2 and all(after <= before for before, after in errors.values())
    plain = dict(load_moefied(tmp_path / "plain")[0].named_parameters())
    refit = dict(load_moefied(tmp_path / "refit")[0].named_parameters())
    assert plain.keys() == refit.keys()
    for name, p in plain.items():
        assert torch.equal(p, refit[name]) != ("down" in name), name  # the down projections, and only they, moved
    assert _run("moe", "prune", str(files["moe"]), "--keep", "2", "--refit", "0.3", "--output",
                str(tmp_path / "never")) == 2
    assert "only with moefy" in capsys.readouterr().err


def test_bad_settings_exit_2_before_writing(files, tmp_path, capsys):
    out = tmp_path / "never"
    assert _run("moe", "prune", str(files["moe"]), "--output", str(out)) == 2  # no --keep
    assert "needs --keep" in capsys.readouterr().err
    assert _run("moe", "moefy", str(files["dense"]), "--experts", "4", "--top-k", "5", "--output", str(out)) == 2
    assert "top_k must be in" in capsys.readouterr().err
    assert _run("moe", "prune", str(files["dense"]), "--keep", "2", "--calib", str(files["text"]), "--eval",
                str(files["text"]), "--output", str(out)) == 2  # a dense model has no experts to remove
    assert "no fused MoE experts" in capsys.readouterr().err
    assert not out.exists()
