"""lm-evaluation-harness tasks (`eval --tasks`, `prune --tasks`) and `datasets` text (--calib-dataset/--eval-dataset),
offline: local tasks over JSON lines and local dataset folders, scores checked against a plain-torch reference."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers_cli import TEXT, make_checkpoint, make_text
from sparsecraft import data, evaluate, lmeval
from sparsecraft.checkpoint import load_masks
from sparsecraft.cli import main
from sparsecraft.models import load_model
from sparsecraft.modules.sparse_linear import SparseLinear, sparsify_model_

# (context, continuation) pairs: a loglikelihood task scored by perplexity = exp(-mean per-document loglikelihood)
LL_DOCS = [("It is a truth", " universally"), ("a single man in", " possession"), ("must be in want", " of a wife")]
# multiple choice: accuracy = mean(argmax of the choices' loglikelihoods == answer)
MC_DOCS = [("It is a truth", [" universally", " of a wife", " man"], 0),
           ("a single man in", [" fortune", " possession"], 1), ("must be in want", [" truth", " of a wife"], 1),
           ("the minds of", [" the surrounding", " daughters"], 0)]


def write_tasks(folder: Path) -> Path:
    """Two lm-eval tasks over local JSON lines: sc_ll (loglikelihood, perplexity) and sc_mc (multiple choice, acc)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ll.jsonl").write_text("".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in LL_DOCS))
    (folder / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": ch, "answer": a}) + "\n"
                                             for q, ch, a in MC_DOCS))
    common = "dataset_path: json\ntest_split: test\ntarget_delimiter: ''\n"  # no space added before continuations
    (folder / "sc_ll.yaml").write_text(
        f"task: sc_ll\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'll.jsonl'}\n"
        "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")
    (folder / "sc_mc.yaml").write_text(
        f"task: sc_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    return folder


@torch.no_grad()
def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Plain reference: sum of log p(continuation token | everything before it)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tok(context + continuation, add_special_tokens=False)["input_ids"]])  # (1, T)
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # (T-1, V)
    targets = ids[0, 1:]
    return float(logp.gather(-1, targets[:, None])[len(ctx) - 1:].sum())


def reference_scores(model, tok) -> dict[str, dict[str, float]]:
    lls = [loglikelihood(model, tok, c, t) for c, t in LL_DOCS]
    hits = [max(range(len(ch)), key=lambda i: loglikelihood(model, tok, q, ch[i])) == a for q, ch, a in MC_DOCS]
    return {"sc_ll": {"perplexity": math.exp(-sum(lls) / len(lls))}, "sc_mc": {"acc": sum(hits) / len(hits)}}


def assert_scores(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for task, metrics in want.items():
        for metric, value in metrics.items():
            assert got[task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lmeval")
    dataset = root / "dataset"  # a local `datasets` folder: train + test splits of JSON lines
    dataset.mkdir()
    records = [p.strip() for p in TEXT.split(",")]
    (dataset / "train.jsonl").write_text("".join(json.dumps({"id": i, "text": r}) + "\n"
                                                 for i, r in enumerate(records * 4)))
    (dataset / "test.jsonl").write_text("".join(json.dumps({"id": i, "text": r}) + "\n"
                                                for i, r in enumerate(records[::-1] * 4)))
    (root / "joined.txt").write_text("\n\n".join(records * 4))  # the same calibration text as a file
    return {"model": make_checkpoint(root / "tiny"), "text": make_text(root / "text.txt"), "root": root,
            "tasks": write_tasks(root / "tasks"), "dataset": dataset, "records": records}


def test_scores_equal_plain_reference_dense_and_packed(assets):
    model, tok = load_model(str(assets["model"]), "float32", "cpu")
    dense = lmeval.run_tasks(model, tok, ["sc_ll", "sc_mc"], str(assets["tasks"]), batch_size=2)
    assert_scores(dense, reference_scores(model, tok))
    assert dense["sc_ll"]["perplexity"] > 1 and "acc_stderr" in dense["sc_mc"]
    by_file = lmeval.run_tasks(model, tok, [str(assets["tasks"] / "sc_ll.yaml")])  # a task YAML path, no task path
    assert by_file["sc_ll"]["perplexity"] == pytest.approx(dense["sc_ll"]["perplexity"], rel=1e-6)
    # a packed model: every block Linear pruned to 50% (magnitude, per layer) and swapped for a SparseLinear
    masks = {}
    for fqn, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in fqn:
            keep = m.weight.abs() >= m.weight.abs().flatten().kthvalue(m.weight.numel() // 2).values
            m.weight.data *= keep
            masks[fqn] = keep
    masked = reference_scores(model, tok)
    sparsify_model_(model, masks, "unstructured")
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 14
    packed = lmeval.run_tasks(model, tok, ["sc_ll", "sc_mc"], str(assets["tasks"]))
    assert_scores(packed, masked)
    assert packed["sc_ll"]["perplexity"] != pytest.approx(dense["sc_ll"]["perplexity"], rel=1e-3)
    assert not model.training


def test_eval_cli_tasks_and_eval_dataset(assets, capsys):
    argv = ["eval", str(assets["model"]), "--tasks", "sc_ll,sc_mc", "--task-path", str(assets["tasks"]),
            "--eval-dataset", str(assets["dataset"]), "--seqlen", "16", "--eval-windows", "3", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    model, tok = load_model(str(assets["model"]), "float32", "cpu")
    ref = reference_scores(model, tok)
    assert f"sc_ll  perplexity  {ref['sc_ll']['perplexity']:.4f}" in out
    assert f"sc_mc  acc  {ref['sc_mc']['acc']:.4f} ± " in out
    # perplexity on the dataset's test split (its default for evaluation): records joined by blank lines
    test_text = "\n\n".join(assets["records"][::-1] * 4)
    windows = data.eval_windows(data.tokenize(tok, test_text), 16, 3)
    assert f"perplexity {evaluate.perplexity(model, windows):.3f} on 3 windows" in out


def test_prune_tasks_in_report_dense_vs_sparse(assets, capsys):
    out = assets["root"] / "pruned"
    argv = ["prune", "--model", str(assets["model"]), "--calib", str(assets["text"]), "--eval", str(assets["text"]),
            "--nsamples", "4", "--seqlen", "16", "--eval-windows", "2", "--batch-size", "2", "--method", "magnitude",
            "--tasks", "sc_ll,sc_mc", "--task-path", str(assets["tasks"]), "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    dense, _ = load_model(str(assets["model"]), "float32", "cpu")
    sparse, tok = load_model(str(out), "float32", "cpu")
    assert_scores({t: {m: v for m, v in s.items() if not m.endswith("_stderr")}
                   for t, s in report["tasks"]["dense"].items()}, reference_scores(dense, tok))
    assert_scores({t: {m: v for m, v in s.items() if not m.endswith("_stderr")}
                   for t, s in report["tasks"]["sparse"].items()}, reference_scores(sparse, tok))
    md = (out / "report.md").read_text()
    ll = report["tasks"]
    dense_ll, sparse_ll = ll["dense"]["sc_ll"]["perplexity"], ll["sparse"]["sc_ll"]["perplexity"]
    assert f"| sc_ll perplexity | {dense_ll:.4f} | {sparse_ll:.4f} |" in md
    assert "| sc_mc acc |" in md
    # the packed folder (SparseLinear layers through from_pretrained) scores as the masked dense model did
    packed, _ = load_model(str(out / "sparse"), "float32", "cpu")
    assert sum(isinstance(m, SparseLinear) for m in packed.modules()) == 14
    assert main(["eval", str(out / "sparse"), "--tasks", "sc_ll,sc_mc", "--task-path", str(assets["tasks"]),
                 "--eval-windows", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"sc_ll  perplexity  {ll['sparse']['sc_ll']['perplexity']:.4f}" in printed
    assert f"sc_mc  acc  {ll['sparse']['sc_mc']['acc']:.4f}" in printed


def test_calib_dataset_equals_the_same_text_as_a_file(assets):
    """--calib-dataset DIR (train split) gives exactly the masks of --calib with the same text in a file."""
    common = ["prune", "--model", str(assets["model"]), "--nsamples", "4", "--seqlen", "16", "--eval-windows", "0",
              "--method", "wanda", "--no-progress"]
    a, b = assets["root"] / "from_dataset", assets["root"] / "from_file"
    assert main(common + ["--calib-dataset", str(assets["dataset"]), "--output", str(a)]) == 0
    assert main(common + ["--calib", str(assets["root"] / "joined.txt"), "--output", str(b)]) == 0
    ma, mb = load_masks(a / "masks.safetensors"), load_masks(b / "masks.safetensors")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert json.loads((a / "settings.json").read_text())["calib_dataset"] == str(assets["dataset"])
    _, tok = load_model(str(assets["model"]), "float32", "cpu")
    windows = data.calibration_data(tok, None, 4, 16, seed=0, dataset=str(assets["dataset"]))
    expected = data.calibration_windows(data.tokenize(tok, (assets["root"] / "joined.txt").read_text()), 4, 16, 0)
    assert torch.equal(windows, expected)


def test_dataset_specs_and_splits(assets, tmp_path):
    d = str(assets["dataset"])
    assert data.parse_dataset_spec("wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert data.parse_dataset_spec("./x::train") == ("./x", None, "train")
    assert data.parse_dataset_spec("name") == ("name", None, None)
    assert data.read_dataset(d, "eval") == data.read_dataset(d + "::test") == "\n\n".join(assets["records"][::-1] * 4)
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train.jsonl").write_text('{"body": "some words"}\n')
    assert data.read_dataset(str(only_train)) == "some words"  # the one string column
    with pytest.raises(ValueError, match=r"no test or validation split \(it has train\); name one, e\.g\. .*::train"):
        data.read_dataset(str(only_train), "eval")
    with pytest.raises(ValueError, match="has no split 'dev'; its splits: train, test"):
        data.read_dataset(d + "::dev")
    with pytest.raises(ValueError, match=r"is not NAME\[:config\]\[:split\]"):
        data.parse_dataset_spec("a:b:c:d")
    with pytest.raises(ValueError, match="cannot load dataset"):
        data.read_dataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not both"):
        data.calibration_data(None, "shakespeare", 4, 16, dataset=d)


@pytest.mark.parametrize("argv, message", [
    (["prune", "--calib", "x.txt", "--calib-dataset", "d"], "--calib and --calib-dataset both give the calib text"),
    (["eval", "m", "--eval", "x.txt", "--eval-dataset", "d"], "--eval and --eval-dataset both give the eval text"),
    (["eval", "m", "--tasks", "sc_ll,NOWHERE.yaml"], "do not exist; pass lm-eval task names or paths to task YAML"),
    (["eval", "m", "--tasks", "sc_ll", "--task-path", "TASKS", "--task-limit", "0"], "task_limit must be >= 1"),
    (["eval", "m", "--eval-windows", "0"], "0 skips perplexity only when --tasks"),
    (["eval", "m", "--tasks", "sc_ll", "--task-path", "NOWHERE"], "is not a folder"),
    (["prune", "--model", "m", "--calib-dataset", "DATASET::train", "--output", "DATASET/out"], "overlaps the input"),
    (["prune", "--model", "m", "--tasks", "sc_ll", "--task-path", "TASKS", "--output", "TASKS/out"],
     "overlaps the input"),
    (["prune", "--model", "m", "--eval-dataset", "a:b:c:d"], "is not NAME[:config][:split]"),
])
def test_bad_inputs_one_line(assets, capsys, argv, message):
    where = {"TASKS": assets["tasks"], "NOWHERE": assets["root"] / "nowhere", "DATASET": assets["dataset"]}
    for name, path in where.items():
        argv = [a.replace(name, str(path)) for a in argv]
    argv = [str(assets["model"]) if a == "m" else a for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_lm_eval_says_how_to_install(assets, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    argv = ["eval", str(assets["model"]), "--tasks", "sc_ll", "--task-path", str(assets["tasks"]), "--no-progress"]
    assert main(argv) == 2
    assert "pip install 'sparsecraft[eval]'" in capsys.readouterr().err


def test_unknown_task_names_checked_against_the_full_index(monkeypatch, tmp_path):
    """A name the task path lacks is looked up in lm-eval's built-in index (slow to build: stubbed here)."""
    class Index:
        def __init__(self, names):
            self.all_tasks, self.all_groups, self.all_tags = names, [], []

    built = []

    def fake_manager(task_path=None, defaults=True):
        built.append(defaults)
        return Index(["sc_ll", "arc_easy"] if defaults else ["sc_ll"])

    monkeypatch.setattr(lmeval, "task_manager", fake_manager)
    assert lmeval.check_tasks(["sc_ll"], str(tmp_path)).all_tasks == ["sc_ll"] and built == [False]
    assert lmeval.check_tasks(["sc_ll", "arc_easy"], str(tmp_path)).all_tasks == ["sc_ll", "arc_easy"]
    assert built == [False, False, True]
    with pytest.raises(ValueError, match=r"unknown lm-eval tasks \['sc_nope'\]: not a task, group or tag of lm-eval "
                                         r"or in .*; list them with `lm-eval ls tasks`"):
        lmeval.check_tasks(["sc_nope", "sc_ll"], str(tmp_path))
    assert lmeval.check_tasks(["arc_easy"]).all_tasks == ["sc_ll", "arc_easy"] and built[-1] is True
    with pytest.raises(ValueError, match="no tasks given"):
        lmeval.check_tasks([])


def test_scores_of_names_metrics_and_drops_non_numbers():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.25, "exact_match,strict-match": 1,
                     "exact_match_stderr,strict-match": "N/A", "sample_len": 3, "bleu,none": True}}
    assert lmeval.scores_of(results) == {"t": {"acc": 0.5, "acc_stderr": 0.25, "exact_match[strict-match]": 1.0}}
    assert lmeval.table(lmeval.scores_of(results)) == [("t", "acc", "0.5000 ± 0.2500"),
                                                       ("t", "exact_match[strict-match]", "1.0000")]
