"""``sparsecraft pack CHECKPOINT_DIR --output DIR``: write the packed sparse checkpoint of a pruned HF folder.

The input is a Hugging Face checkpoint folder with ``masks.safetensors`` (keep-masks keyed by module fqn) and
``settings.json`` (at least {"pattern": "2:4"}), as written by ``sparsecraft prune`` or ``finetune``. The output
folder gets ``model.safetensors`` in the packed layout (docs/formats.md, readable by
``sparsecraft.checkpoint.load_packed_state_dict`` and ``sparsecraft.checkpoint.load_packed_model_``), plus the
config (with ``quant_method: "sparsecraft"``: ``AutoModelForCausalLM.from_pretrained`` loads it after ``import
sparsecraft``, see sparsecraft.hf_quantizer), tokenizer, generation config and settings files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from sparsecraft.checkpoint import PACKED_FILE, load_masks, save_packed
from sparsecraft.hf_quantizer import complete_packed_folder
from sparsecraft.io import StagedOutput, check_output
from sparsecraft.models import load_model, parse_dtype
from sparsecraft.patterns import parse_pattern

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "settings.json", "plan.json")
SETTINGS_FILES = ("settings.json", "plan.json")  # plan.json: folders of sparsecraft 0.1


def load_model_only(spec: str, dtype: torch.dtype) -> nn.Module:
    """A causal LM without its tokenizer (pack and bench need only the weights); non-folders go through
    sparsecraft.models.load_model (hub ids, .gguf files, the embedded default)."""
    if not Path(spec).is_dir():
        return load_model(spec, dtype=dtype)[0]
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype or "auto").eval()  # None: the stored dtype
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"could not load a model from {spec}: {str(e).splitlines()[0][:300]}; it needs config.json "
                         f"and model weights (a Hugging Face checkpoint folder)") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack a pruned checkpoint into the sparse on-disk format",
                       description="Pack a pruned Hugging Face checkpoint folder (with masks.safetensors and "
                                   "settings.json) into sparse formats: values + bitmask, N:M or block.")
    p.add_argument("checkpoint", help="folder with a HF checkpoint, masks.safetensors and settings.json")
    p.add_argument("--output", required=True, help="output folder for the packed checkpoint")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16 (default: the run's settings, "
                                                 "else auto = the checkpoint's own dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def read_plan(folder: Path) -> dict:
    """The run's settings: ``settings.json`` (written by prune and finetune), else a ``plan.json`` of sparsecraft
    0.1; it must name the ``pattern``."""
    for name in SETTINGS_FILES:
        path = folder / name
        if path.is_file():
            break
    else:
        raise ValueError(f"{folder} has no settings.json; pass a folder written by `sparsecraft prune`, or write one "
                         f"with at least {{\"pattern\": \"2:4\"}} (or 'unstructured', '4x4')")
    try:
        plan = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix it or rewrite it as {{\"pattern\": \"2:4\"}}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("pattern"), str):
        raise ValueError(f"{path} has no 'pattern' entry; add e.g. \"pattern\": \"2:4\" or \"unstructured\"")
    return plan


def check_inputs(checkpoint: Path) -> None:
    if not checkpoint.exists():
        raise ValueError(f"{checkpoint} does not exist; pass the output folder of `sparsecraft prune`")
    if not checkpoint.is_dir():
        raise ValueError(f"{checkpoint} is not a folder; pass the output folder of `sparsecraft prune`")
    if not (checkpoint / "masks.safetensors").is_file():
        raise ValueError(f"{checkpoint} has no masks.safetensors; pass a folder written by `sparsecraft prune`")


def check_masks(model: nn.Module, masks: dict) -> None:
    modules = dict(model.named_modules())
    unknown = [fqn for fqn in masks if fqn not in modules or not hasattr(modules[fqn], "weight")]
    if unknown:
        raise ValueError(f"masks.safetensors names {len(unknown)} modules this model lacks, e.g. {unknown[:3]}; "
                         f"is it the checkpoint the masks were made for?")
    for fqn, keep in masks.items():
        if tuple(keep.shape) != tuple(modules[fqn].weight.shape):
            raise ValueError(f"mask {fqn} has shape {tuple(keep.shape)} but the weight is "
                             f"{tuple(modules[fqn].weight.shape)}; the masks belong to another model")


def run(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    output = check_output(args.output, [checkpoint], overwrite=args.overwrite)  # before anything is read or written
    check_inputs(checkpoint)
    plan = read_plan(checkpoint)
    pattern = parse_pattern(plan["pattern"])
    dtype = parse_dtype(args.dtype or plan.get("dtype") or "auto")
    masks = load_masks(checkpoint / "masks.safetensors")
    model = load_model_only(str(checkpoint), dtype)
    check_masks(model, masks)
    with StagedOutput(output) as stage:  # swapped in only when complete; the old output stays until then
        sizes = save_packed(model, masks, pattern, stage.path / PACKED_FILE)
        for name in COPIED:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, stage.path / name)
        complete_packed_folder(stage.path, checkpoint)  # config.json with quant_method sparsecraft, tokenizer
    ratio = sizes["packed_bytes"] / max(1, sizes["dense_bytes"])
    print(f"packed {len(masks)} weights ({pattern}): {sizes['dense_bytes'] / 2**20:.1f} MiB dense -> "
          f"{sizes['packed_bytes'] / 2**20:.1f} MiB packed ({100 * ratio:.1f}%); wrote {args.output}/{PACKED_FILE}")
    return 0
