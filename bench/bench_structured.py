"""Structured pruning on SmolLM2-135M, in four parts (run one at a time; each writes its own json):

    # perplexity vs parameters kept per axis, combinations and the magnitude baseline (+ docs/img plot)
    .venv/bin/python bench/bench_structured.py --part sweep --out runs/structured_sweep.json \
        --plot docs/img/structured_ppl_vs_params.png
    # distillation of one model at a token budget, perplexity every --curve-every steps (the recovery curve);
    # --masked 2:4 distills a wanda 2:4 pruned model with its masks fixed instead of a shrunk one
    .venv/bin/python bench/bench_structured.py --part distill --label mlp --distill-tokens 65536 --curve-every 16
    # decode (batch 1) and prefill (512 tokens) speed of shrunk shapes vs dense, one interleaved run; peak memory
    .venv/bin/python bench/bench_structured.py --part speed --threads 2
    # peak memory again for the shapes of a speed json (rebuilt from their sizes; one child process each)
    .venv/bin/python bench/bench_structured.py --part memory --out runs/structured_speed.json
    # the decision table: shrink vs wanda unstructured / 2:4 run with the packed kernels, same decode race
    .venv/bin/python bench/bench_structured.py --part decide --threads 2
    # the sweep plot from several sweep jsons (merged) with distilled models as stars; loads no model
    .venv/bin/python bench/bench_structured.py --part plot-sweep --out runs/s1.json,runs/s2.json \
        --distilled runs/a.json --plot docs/img/structured_ppl_vs_params.png
    # the decision plot from the decide json (--out) and the distill jsons; loads no model
    .venv/bin/python bench/bench_structured.py --part plot-decide --out runs/structured_decide.json \
        --distilled runs/a.json,runs/b.json --plot docs/img/structured_decision.png

``--part compare`` is the earlier run: magnitude vs activation-aware vs learned gates at 75% (``--only``).
Labels name a run: "<axes joined by +>[ <method>]", method default activation; "slicegpt" = activation + rotation.
Every ratio is measured within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

from sparsecraft import data, evaluate, prune
from sparsecraft.models import load_model
from sparsecraft.modules import SparseLinear
from sparsecraft.structured import ShrinkConfig, shrink
from sparsecraft.structured.distill import DistillConfig, distill
from sparsecraft.structured.gates import GateConfig

SWEEP = ["mlp", "heads", "hidden", "depth", "mlp+heads", "mlp+depth", "mlp+heads+hidden", "mlp+hidden slicegpt",
         "mlp magnitude", "mlp+heads magnitude"]
COMPARE = ["mlp+heads magnitude", "mlp+heads activation", "mlp+heads wanda", "mlp+heads learned", "depth learned",
           "mlp magnitude", "mlp wanda", "mlp flap", "mlp learned", "mlp+heads+hidden magnitude",
           "mlp+heads+hidden wanda", "mlp+hidden slicegpt"]
SPEED = ["mlp", "heads", "hidden", "depth", "mlp+heads"]


def parse_label(label: str) -> tuple[tuple[str, ...], str, bool]:
    """"mlp+heads wanda" -> (("mlp", "heads"), "wanda", False); "mlp+hidden slicegpt" rotates."""
    words = label.split()
    method = words[1] if len(words) > 1 else "activation"
    return tuple(words[0].split("+")), ("activation" if method == "slicegpt" else method), method == "slicegpt"


def shrunk(dense: torch.nn.Module, calib: torch.Tensor, label: str, fraction: float,
           gates: GateConfig = GateConfig()) -> tuple[torch.nn.Module, dict]:
    axes, method, rot = parse_label(label)
    model = copy.deepcopy(dense)
    res = shrink(model, calib, ShrinkConfig(params=fraction, axes=axes, method=method, rotate=rot, gates=gates))
    return model, {"kept": res.kept_fraction, "sizes": res.sizes, "seconds": res.seconds}


def part_sweep(args, dense, calib, ev, out: dict, save) -> None:
    labels = args.only.split(",") if args.only else (COMPARE if args.part == "compare" else SWEEP)
    fractions = [0.75] if args.part == "compare" else [float(f) for f in args.fractions.split(",")]
    gates = GateConfig(steps=args.learn_steps, batch_size=args.learn_batch)
    for label in labels:
        for f in fractions:
            row = {"label": label.strip(), "target": f}
            try:
                model, info = shrunk(dense, calib, label.strip(), f, gates)
                row.update(info, ppl=evaluate.perplexity(model, ev))
                del model
            except ValueError as e:  # e.g. a fraction no uniform width reaches: reported, not fatal
                row["error"] = str(e)
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
            save()
    if args.plot:
        plot_sweep(out, Path(args.plot))


def plot_sweep(out: dict, path: Path, distilled: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in out["runs"]):
        rows = sorted((r["kept"], r["ppl"]) for r in out["runs"] if r["label"] == label and "ppl" in r)
        style = "--" if "magnitude" in label else "o-"
        ax.plot([*[k for k, _ in rows], 1.0], [*[p for _, p in rows], out["dense_ppl"]], style, label=label,
                markersize=4)
    for d in distilled:  # the same model after distillation, at its size
        ax.plot([d["kept"]], [d["after"]], "*", markersize=11, label=f"{d['label']} + distill {d['tokens']:,} tokens")
    ax.axhline(out["dense_ppl"], color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of parameters kept")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("SmolLM2-135M, structured (lines: before distillation)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Curve(TrainerCallback):
    """Perplexity every ``every`` optimizer steps (and at the last one): the recovery curve."""

    def __init__(self, ev: torch.Tensor, every: int, tokens_per_step: int, rows: list, save) -> None:
        self.ev, self.every, self.tokens_per_step, self.rows, self.save = ev, every, tokens_per_step, rows, save
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        model.eval()
        ppl = evaluate.perplexity(model, self.ev)
        model.train()
        self.rows.append({"step": state.global_step, "tokens": state.global_step * self.tokens_per_step,
                          "ppl": ppl, "seconds": time.perf_counter() - self.t0})
        print(json.dumps(self.rows[-1]), flush=True)
        self.save()


def part_distill(args, dense, calib, ev, train, out: dict, save) -> None:
    if args.masked:  # prune + masked distillation: wanda with the given pattern, masks fixed while training
        student = copy.deepcopy(dense)
        res = prune(student, "wanda", args.masked_sparsity, args.masked, calibration=calib, progress=False)
        keep, info = res.masks, {"label": f"wanda {args.masked}", "sparsity": res.sparsity}
    else:
        student, info = shrunk(dense, calib, args.label, args.fraction)
        keep, info["label"] = None, args.label
    cfg = DistillConfig(tokens=args.distill_tokens, seqlen=args.seqlen, batch_size=args.distill_batch, lr=args.lr,
                        temperature=args.temperature)
    out["distill"] = {**info, "before": evaluate.perplexity(student, ev), "config": vars(cfg), "curve": []}
    out["distill"]["curve"].append({"step": 0, "tokens": 0, "ppl": out["distill"]["before"], "seconds": 0.0})
    save()
    curve = Curve(ev, args.curve_every, cfg.batch_size * args.seqlen, out["distill"]["curve"], save)
    work = Path(args.out).with_suffix(".kd")
    t = time.perf_counter()
    out["distill"].update(distill(student, dense, train, cfg, work, keep=keep, callbacks=[curve]))
    d = out["distill"]
    d.update(after=evaluate.perplexity(student, ev), seconds=time.perf_counter() - t)
    d["gap_removed"] = (d["before"] - d["after"]) / (d["before"] - out["dense_ppl"])
    if keep is not None:  # the masks held: every pruned weight is still exactly 0
        d["zeros_held"] = all(not student.get_submodule(f).weight[~k].any() for f, k in keep.items())
    print(json.dumps({k: v for k, v in d.items() if k != "curve"}), flush=True)


@torch.no_grad()
def speed(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """-> (decode tokens/s at batch 1 after a 16-token prompt, prefill tokens/s of the whole 512-token prompt)."""
    t = time.perf_counter()
    model(input_ids=prompt, use_cache=False)
    prefill = prompt.numel() / (time.perf_counter() - t)
    _, decode = evaluate.greedy_decode(model, prompt[:, :16], new_tokens)
    return decode, prefill


def peak_memory(config: dict, threads: int) -> float:
    """Peak RSS (MiB) a fresh process adds by building this shape and running prefill(512) + decode(32)."""
    out = subprocess.run([sys.executable, __file__, "--part", "memory-child", "--threads", str(threads)],
                         input=json.dumps(config), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def _status_mib(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB (ru_maxrss would carry the parent's size across fork + exec)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def memory_child() -> None:
    cfg = AutoConfig.for_model(**json.loads(sys.stdin.read()))
    base = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS (Linux)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    speed(model, torch.randint(0, cfg.vocab_size, (1, 512)), 32)
    print(json.dumps({"peak_mib": _status_mib("VmHWM") - base}))


def part_memory(args, dense, out: dict, save) -> None:
    """Peak memory of every shape in a --part speed json (--out), rebuilt from its sizes; rewrites that json."""
    out.update(json.loads(Path(args.out).read_text()))
    out["speed_load_average"] = out.pop("load_average", None)  # the timing run's; this run records its own
    for name, row in out["speed"].items():
        sizes = row["sizes"] or {}
        cfg = dense.config.to_dict()
        if sizes:
            groups = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
            cfg.update(intermediate_size=sizes["mlp"], num_key_value_heads=sizes["heads"],
                       num_attention_heads=sizes["heads"] * groups, hidden_size=sizes["hidden"],
                       num_hidden_layers=sizes["depth"])
            cfg.pop("layer_types", None)
        row["peak_mib"] = peak_memory(cfg, args.threads or 1)
        print(name, f"{row['peak_mib']:.0f} MiB", flush=True)
        save()


def part_speed(args, dense, calib, prompt, out: dict, save) -> None:
    models = {"dense": (dense, {"kept": 1.0})}
    for item in (args.only.split(",") if args.only else SPEED):
        label, _, at = item.partition("@")  # "heads@0.87": this label at this fraction only
        for f in [float(at)] if at else [float(x) for x in args.fractions.split(",")]:
            try:  # weights do not change speed: magnitude picks the same shapes without calibration
                models[f"{label} {f:g}"] = shrunk(dense, calib, label.split()[0] + " magnitude", f)
            except ValueError as e:
                print(f"skip {label} {f}: {e}", flush=True)
    timing = {k: [] for k in models}
    for _ in range(args.repeats):  # interleaved, best of repeats
        for name, (model, _) in models.items():
            timing[name].append(speed(model, prompt, args.decode_tokens))
    best = {k: (max(d for d, _ in v), max(p for _, p in v)) for k, v in timing.items()}
    d0, p0 = best["dense"]
    out["speed"] = {}
    for name, (model, info) in models.items():
        d, p = best[name]
        mem = peak_memory(model.config.to_dict(), args.threads or 1)
        out["speed"][name] = {"kept": info["kept"], "sizes": info.get("sizes"), "decode_tok_s": d, "prefill_tok_s": p,
                              "decode_x": d / d0, "prefill_x": p / p0, "peak_mib": mem}
        print(name, json.dumps(out["speed"][name]), flush=True)
        save()


def part_decide(args, dense, calib, ev, prompt, out: dict, save) -> None:
    """Shrink (best combination at each fraction) vs wanda unstructured / 2:4 packed, in one decode race."""
    entries, contexts, rows = {"dense": dense}, {}, {}
    for f in [float(x) for x in args.fractions.split(",")]:
        model, info = shrunk(dense, calib, args.label, f)
        entries[f"shrink {args.label} {f:g}"] = model
        rows[f"shrink {args.label} {f:g}"] = {"kept": info["kept"], "ppl": evaluate.perplexity(model, ev)}
    for pattern, sparsity in [("unstructured", s) for s in args.sparsities] + [("2:4", None)]:
        model = copy.deepcopy(dense)
        res = prune(model, "wanda", sparsity, pattern, calibration=calib, progress=False)
        name = f"wanda {pattern} {res.sparsity:.2f}"
        packed = {f: SparseLinear.from_dense(model.get_submodule(f), k, pattern) for f, k in res.masks.items()}
        entries[name] = model
        contexts[name] = (lambda m=model, p=packed: evaluate.swapped_in(m, p))
        zeros = sum(int((~k).sum()) for k in res.masks.values())
        rows[name] = {"kept": 1 - zeros / sum(p.numel() for p in dense.parameters()),
                      "ppl": evaluate.perplexity(model, ev), "sparsity": res.sparsity}
        print(name, json.dumps(rows[name]), flush=True)
    rates, _ = evaluate.decode_race(entries, prompt[:, :16], args.decode_tokens, args.repeats, contexts=contexts)
    for name, row in rows.items():
        row.update(decode_tok_s=rates[name], decode_x=rates[name] / rates["dense"])
    out["decide"] = {"dense_tok_s": rates["dense"], "rows": rows}
    print(json.dumps(out["decide"], indent=1), flush=True)
    save()


def plot_decide(out: dict, distilled: list[dict], path: Path) -> None:
    """Perplexity vs measured decode speedup: shrink (one line over fractions) vs packed wanda points; distilled
    models (``distilled``: the ``distill`` records of --part distill runs) drawn at their undistilled twin's speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["decide"]["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    shrink_rows = sorted((r["decode_x"], r["ppl"], n) for n, r in rows.items() if n.startswith("shrink"))
    ax.plot([x for x, _, _ in shrink_rows], [p for _, p, _ in shrink_rows], "o-", label="shrink (dense, smaller)")
    for x, p, n in shrink_rows:
        ax.annotate(f"{rows[n]['kept']:.0%}", (x, p), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for n, r in rows.items():
        if not n.startswith("shrink"):
            ax.plot([r["decode_x"]], [r["ppl"]], "s", label=f"{n} packed ({r['kept']:.0%} params)")
    for d in distilled:
        if d["label"].startswith("wanda"):  # the packed twin of a masked distillation
            twin = next(n for n in rows if n.startswith(d["label"] + " "))
        else:  # the shrunk twin of the same size
            twin = min((n for n in rows if n.startswith("shrink")), key=lambda n: abs(rows[n]["kept"] - d["kept"]))
        ax.plot([rows[twin]["decode_x"]], [d["after"]], "*", markersize=11,
                label=f"{twin} + distill {d['tokens']:,} tokens")
    ax.axhline(out["dense_ppl"], color="grey", lw=0.8)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("decode tokens/s vs dense (batch 1, this CPU, one race)")
    ax.set_ylabel("perplexity (log)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["sweep", "compare", "distill", "speed", "decide", "plot-sweep", "plot-decide",
                                       "memory", "memory-child"],
                    default="sweep")
    ap.add_argument("--fractions", default="0.9,0.75,0.6,0.5")
    ap.add_argument("--calib", type=int, default=8, help="calibration windows")
    ap.add_argument("--eval", type=int, default=4, help="evaluation windows")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--only", default="", help="comma list of run labels (default: the part's list); speed: "
                    "label@fraction times one size only")
    ap.add_argument("--plot", default="", help="sweep: write perplexity vs parameters kept here")
    ap.add_argument("--distilled", default="", help="plot-decide: comma list of --part distill jsons to draw")
    ap.add_argument("--label", default="mlp", help="distill / decide: the shrink run")
    ap.add_argument("--fraction", type=float, default=0.75, help="distill: parameters kept")
    ap.add_argument("--masked", default="", help="distill: a wanda pattern (2:4, unstructured) with masks fixed")
    ap.add_argument("--masked-sparsity", type=float, default=0.5)
    ap.add_argument("--sparsities", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.5])
    ap.add_argument("--distill-tokens", type=int, default=65536)
    ap.add_argument("--distill-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=DistillConfig.lr)
    ap.add_argument("--temperature", type=float, default=DistillConfig.temperature)
    ap.add_argument("--curve-every", type=int, default=16, help="distill: perplexity every this many steps")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--learn-steps", type=int, default=64, help="gate training steps for the learned runs")
    ap.add_argument("--learn-batch", type=int, default=1, help="windows per gate training step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "memory-child":
        return memory_child()
    if args.part == "plot-sweep":  # no model: sweep jsons (--out, comma list, merged) -> the sweep plot
        runs = [json.loads(Path(f).read_text()) for f in args.out.split(",")]
        done = [json.loads(Path(f).read_text())["distill"] for f in args.distilled.split(",") if f]
        return plot_sweep({**runs[0], "runs": [r for x in runs for r in x["runs"]]}, Path(args.plot), done)
    if args.part == "plot-decide":  # no model: the decide json + distill jsons -> the decision plot
        done = [json.loads(Path(f).read_text())["distill"] for f in args.distilled.split(",") if f]
        return plot_decide(json.loads(Path(args.out).read_text()), done, Path(args.plot))
    torch.manual_seed(0)
    dense, tok = load_model(None)
    stream = data.tokenize(tok, data.read_text("shakespeare", "calib"))
    calib = data.calibration_windows(stream, args.calib, args.seqlen, seed=0)
    eval_stream = data.tokenize(tok, data.read_text("shakespeare", "eval"))
    ev = data.eval_windows(eval_stream, args.seqlen, args.eval)
    out: dict = {"settings": vars(args), "dense_ppl": evaluate.perplexity(dense, ev), "runs": []}
    print(f"dense ppl {out['dense_ppl']:.2f}", flush=True)
    path = Path(args.out or f"runs/structured_{args.part}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    args.out = str(path)

    def save() -> None:
        path.write_text(json.dumps(out, indent=1))

    prompt = data.eval_windows(eval_stream, 512, 1)
    if args.part in ("sweep", "compare"):
        part_sweep(args, dense, calib, ev, out, save)
    elif args.part == "distill":
        train = data.calibration_windows(stream, max(64, args.distill_tokens // args.seqlen), args.seqlen, seed=1)
        part_distill(args, dense, calib, ev, train, out, save)
    elif args.part == "speed":
        part_speed(args, dense, calib, prompt, out, save)
    elif args.part == "memory":
        part_memory(args, dense, out, save)
    else:
        part_decide(args, dense, calib, ev, prompt, out, save)
    out["load_average"] = Path("/proc/loadavg").read_text().split()[:3]
    save()


if __name__ == "__main__":
    main()
