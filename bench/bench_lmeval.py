"""lm-evaluation-harness on SmolLM2-135M as sparsecraft runs it: dense vs magnitude-pruned (masked) vs packed.

    python bench/bench_lmeval.py --docs 200 --sparsity 0.5

Offline: the task is written here, over local JSON lines (no hub): "end of the line in Hamlet", a multiple-choice
task whose context is two consecutive lines of the held-out play and the first half of the next one (cut at a word),
and whose choices are the true second half and the second halves of three lines drawn at random elsewhere in the
play (seeded). Every decoder Linear is pruned by magnitude with
topk_mask (no calibration); the masked model runs the pruned weights densely, the packed one through SparseLinear,
so both must score the same. Prints each variant's scores, its lm-eval wall time and the packed/masked time ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from sparsecraft import data, lmeval
from sparsecraft.models import load_model
from sparsecraft.modules.sparse_linear import sparsify_model_
from sparsecraft.patterns import topk_mask


def hamlet_task(folder: Path, docs: int, seed: int) -> str:
    lines = [ln.strip() for ln in data.read_text(next(f for f in data.default_texts("eval")
                                                      if f.name.startswith("hamlet")), "eval").splitlines()]
    lines = [ln for ln in lines if 20 <= len(ln) <= 80]
    rng = random.Random(seed)
    cut = [ln.find(" ", len(ln) // 2) for ln in lines]  # first half | " second half" (at a word)
    starts = rng.sample([i for i in range(len(lines) - 3) if cut[i + 2] > 0], docs)
    rows = []
    for i in starts:
        others = rng.sample([j for j in range(len(lines)) if abs(j - i - 2) > 3 and cut[j] > 0], 3)
        choices = [lines[j][cut[j]:] for j in [i + 2] + others]
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"context": f"{lines[i]}\n{lines[i + 1]}\n{lines[i + 2][:cut[i + 2]]}",
                     "choices": [choices[k] for k in order], "answer": order.index(0)})
    (folder / "hamlet_next.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": "hamlet_next", "dataset_path": "json", "test_split": "test", "target_delimiter": "",
            "dataset_kwargs": {"data_files": {"test": str(folder / "hamlet_next.jsonl")}},
            "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    (folder / "hamlet_next.yaml").write_text(yaml.safe_dump(task))
    return "hamlet_next"


def magnitude_masks_(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    masks = {}
    for fqn, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in fqn:
            keep = topk_mask(m.weight.detach().abs(), sparsity, "unstructured")
            m.weight.data.mul_(keep)
            masks[fqn] = keep
    return masks


def timed(name: str, model, tok, task: str, folder: Path, batch_size: int) -> tuple[str, dict, float]:
    t = time.perf_counter()
    s = lmeval.run_tasks(model, tok, [task], str(folder), batch_size=batch_size)[task]
    secs = time.perf_counter() - t
    print(f"{name:28s} acc {s['acc']:.4f} ± {s['acc_stderr']:.4f}  acc_norm {s['acc_norm']:.4f}  {secs:6.1f} s",
          flush=True)
    return name, s, secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model, tok = load_model("default", "float32", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        task = hamlet_task(folder, args.docs, args.seed)
        print(f"task hamlet_next: {args.docs} documents, 4 choices (chance 0.25), SmolLM2-135M fp32, "
              f"{torch.get_num_threads()} threads", flush=True)
        rows = [timed("dense", model, tok, task, folder, args.batch_size)]
        masks = magnitude_masks_(model, args.sparsity)
        rows.append(timed(f"magnitude {args.sparsity:g} (masked)", model, tok, task, folder, args.batch_size))
        sparsify_model_(model, masks, "unstructured")
        rows.append(timed(f"magnitude {args.sparsity:g} (packed)", model, tok, task, folder, args.batch_size))
    same = all(rows[2][1][m] == rows[1][1][m] for m in ("acc", "acc_norm"))
    print(f"packed / masked lm-eval time: {rows[2][2] / rows[1][2]:.2f}x; packed scores == masked scores: {same}")


if __name__ == "__main__":
    main()
