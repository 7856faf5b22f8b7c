"""lm-evaluation-harness tasks on the model as sparsecraft runs it (optional: ``pip install 'sparsecraft[eval]'``).

The already-loaded model (dense, masked or with packed ``SparseLinear`` layers) is wrapped in lm-eval's ``HFLM``
as is: nothing is reloaded from disk, so the scores are those of the exact modules sparsecraft measured.

A task is a registered lm-eval task name (``hellaswag``, ``arc_easy``: the harness downloads their data), a path
to a task YAML file, or the name of a task defined in a ``task_path`` folder of YAML files (lm-eval's
``--include_path``). A task YAML over local JSON lines runs offline::

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/my_task.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc}]

Scores come back as ``{task: {metric: value}}`` with lm-eval's filter suffix dropped (``acc,none`` -> ``acc``;
another filter keeps its name: ``exact_match,strict-match`` -> ``exact_match[strict-match]``); a metric's standard
error is ``METRIC_stderr``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

INSTALL_HINT = "pip install 'sparsecraft[eval]' (lm-evaluation-harness)"


def check_installed() -> None:
    """A ValueError saying how to install lm-eval when it is missing (checked before any model loads)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError(f"--tasks needs lm-evaluation-harness, which is not installed; {INSTALL_HINT}") from None


def task_manager(task_path: str | None = None, defaults: bool = True):
    """lm-eval's task index: the YAML files under ``task_path`` plus (``defaults``) the built-in tasks, whose
    index takes seconds to build."""
    check_installed()
    from lm_eval.tasks import TaskManager

    if task_path is not None and not Path(task_path).is_dir():
        raise ValueError(f"task path {task_path} is not a folder; pass a folder of lm-eval task YAML files")
    return TaskManager(include_path=task_path, include_defaults=defaults)


def _unknown(tasks: list[str], manager) -> list[str]:
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    return [t for t in tasks if t not in known and not t.endswith((".yaml", ".yml"))]  # files: checked above


def check_tasks(tasks: list[str], task_path: str | None = None):
    """Every task is a known name or an existing YAML file, else one line naming the unknown ones -> the manager
    (the built-in index is skipped when ``task_path`` and YAML files cover every task)."""
    if not tasks:
        raise ValueError("no tasks given; pass --tasks with comma-separated lm-eval task names, e.g. --tasks arc_easy")
    missing = [t for t in tasks if t.endswith((".yaml", ".yml")) and not Path(t).is_file()]
    if missing:
        raise ValueError(f"task files {missing} do not exist; pass lm-eval task names or paths to task YAML files")
    if task_path is not None or all(t.endswith((".yaml", ".yml")) for t in tasks):
        manager = task_manager(task_path, defaults=False)
        if not _unknown(tasks, manager):
            return manager
    manager = task_manager(task_path)
    unknown = _unknown(tasks, manager)
    if unknown:
        where = f" or in {task_path}" if task_path else ""
        raise ValueError(f"unknown lm-eval tasks {unknown}: not a task, group or tag of lm-eval{where}, nor a task "
                         f"YAML file; list them with `lm-eval ls tasks`, or pass --task-path FOLDER for your own")
    return manager


def _metric_name(key: str) -> str:
    """lm-eval's 'acc,none' -> 'acc'; 'acc_stderr,none' -> 'acc_stderr'; other filters kept in brackets."""
    metric, _, filt = key.partition(",")
    if filt in ("", "none"):
        return metric
    stderr = metric.endswith("_stderr")
    base = metric.removesuffix("_stderr")
    return f"{base}[{filt}]" + ("_stderr" if stderr else "")


def scores_of(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` section -> {task: {metric: value}}, numbers only (stderr 'N/A' dropped)."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results.items():
        out[task] = {_metric_name(k): float(v) for k, v in row.items()
                     if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], task_path: str | None = None, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 1, seed: int = 0, bootstrap_iters: int = 1000,
              manager=None) -> dict[str, dict[str, float]]:
    """lm-eval ``tasks`` on ``model`` as loaded (its device, dtype and modules) -> {task: {metric: value}}.

    ``limit`` caps the documents per task (lm-eval's --limit: a quick look, not a comparable score).
    ``bootstrap_iters``: resamples for the standard error of metrics without a closed form (perplexity, f1, bleu);
    lm-eval's default of 100000 runs a process pool for seconds to minutes per metric; 1000 gives the stderr to
    about 2% (its relative error is about 1/sqrt(2 * iters)). Mean metrics (acc) have a closed-form stderr."""
    manager = manager or check_tasks(tasks, task_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit < 1:
        raise ValueError(f"task limit must be >= 1, got {limit}")
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)  # wraps the instance; nothing reloads
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=bootstrap_iters,
                              random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    if out is None:  # only non-zero ranks of a distributed run get None
        return {}
    return scores_of(out["results"])


def table(scores: dict[str, dict[str, float]]) -> list[tuple[str, str, str]]:
    """(task, metric, value ± stderr) rows, stderr folded into its metric's row."""
    rows = []
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            err = metrics.get(f"{metric}_stderr")
            rows.append((task, metric, f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")))
    return rows
