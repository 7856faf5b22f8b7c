"""The packed folder as a Hugging Face checkpoint (quant_method "sparsecraft"): from_pretrained builds SparseLinear
layers from the packed tensors (logits equal to the masked dense model), generate, save_pretrained round trip,
refusal without sparsecraft, corrupt files refused at from_pretrained, eval / pack / inspect on packed folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sparsecraft  # noqa: F401  registers the quantizer
from helpers_cli import make_checkpoint, make_text
from sparsecraft.checkpoint import load_masks, load_packed_model_
from sparsecraft.cli import main
from sparsecraft.hf_quantizer import GUARD
from sparsecraft.modules import SparseLinear


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hfq")
    model, text = make_checkpoint(root / "tiny"), make_text(root / "text.txt")
    for name, pattern in (("u50", "unstructured"), ("nm24", "2:4")):
        assert main(["prune", "--model", str(model), "--calib", str(text), "--eval", str(text), "--method", "wanda",
                     "--sparsity", "0.5", "--pattern", pattern, "--nsamples", "4", "--seqlen", "32",
                     "--eval-windows", "2", "--output", str(root / name), "--no-progress"]) == 0
    return {"root": root, "text": text, "u50": root / "u50", "nm24": root / "nm24"}


def load(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def tokens() -> torch.Tensor:
    return torch.randint(2, 60, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("run", ["u50", "nm24"])
def test_from_pretrained_builds_sparse_layers_equal_to_masked_dense(runs, run):
    out = runs[run]
    masks = load_masks(out / "masks.safetensors")
    packed, dense = load(out / "sparse"), load(out)
    modules = dict(packed.named_modules())
    assert len(masks) == 14 and all(isinstance(modules[fqn], SparseLinear) for fqn in masks)
    for fqn, keep in masks.items():  # only the kept values are held, no dense copy of the weight
        nnz = int(keep.sum())
        assert nnz == keep.numel() // 2 and int(modules[fqn].row_ptr[-1]) == nnz
        assert modules[fqn].values.numel() <= nnz + 16  # the kernel layout pads a few values at most
        assert torch.equal(modules[fqn].keep(), keep)
        assert not any(k.startswith(fqn + ".") and k.endswith("weight") for k in packed.state_dict())
    assert packed.config.quantization_config.packed_modules == sorted(masks)
    reference = load(out)  # the same SparseLinear layers built by sparsecraft's own loader
    assert load_packed_model_(reference, out / "sparse")["sparse"] == sorted(masks)
    x = tokens()
    with torch.no_grad():
        logits = packed(x).logits
        assert torch.equal(logits, reference(x).logits)
        # the masked dense model sums the same products in another order (kernel vs GEMM): equal up to rounding
        torch.testing.assert_close(logits, dense(x).logits, rtol=1e-5, atol=1e-5)
        gen = packed.generate(x[:1, :8], max_new_tokens=6, do_sample=False)
        assert torch.equal(gen, reference.generate(x[:1, :8], max_new_tokens=6, do_sample=False))
    assert gen.shape == (1, 14)


def test_save_pretrained_round_trips_bit_exactly(runs, tmp_path):
    packed = load(runs["u50"] / "sparse")
    packed.save_pretrained(tmp_path / "again")
    a, b = load_file(str(runs["u50"] / "sparse" / "model.safetensors")), load_file(str(tmp_path / "again" /
                                                                                      "model.safetensors"))
    assert set(a) == set(b) and any("@" in k for k in a)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "sparsecraft"
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "again")(tokens()).logits, packed(tokens()).logits)


def test_without_sparsecraft_loading_fails_naming_the_package(runs):
    code = ("import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
            "assert 'sparsecraft' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code, str(runs["u50"] / "sparse")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and "pip install sparsecraft" in last and "import sparsecraft" in last
    config = json.loads((runs["u50"] / "sparse" / "config.json").read_text())
    assert config["transformers_weights"] == GUARD
    assert config["quantization_config"] == {"quant_method": "sparsecraft", "format_version": 1,
                                             "pattern": "unstructured", "packed_modules": sorted(
                                                 load_masks(runs["u50"] / "masks.safetensors"))}


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a packed folder, applying ``edit(tensors)`` to its file; the checksums are dropped so that the format
    validation (not the sha256 check) is what must refuse the tensors."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["sparsecraft"])
    meta.pop("sha256", None)
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"sparsecraft": json.dumps(meta), "format": "pt"})
    return dst


KEY = "model.layers.0.mlp.up_proj.weight"


def _drop_value(t):
    t[f"{KEY}@values"] = t[f"{KEY}@values"][:-1]


def _flip_bit(t):
    t[f"{KEY}@mask"] = t[f"{KEY}@mask"].clone()
    t[f"{KEY}@mask"][0, 0] ^= 1


def _short_mask(t):
    t[f"{KEY}@mask"] = t[f"{KEY}@mask"][:-1]


def _bad_shape(t):
    t[f"{KEY}@shape"] = torch.tensor([64, 31])


@pytest.mark.parametrize("edit,message", [
    (_drop_value, r"up_proj\.weight_values: expected float32"), (_flip_bit, r"up_proj\.weight_values: expected"),
    (_short_mask, r"up_proj\.weight_mask: expected uint8 \(64, 4\)"),
    (_bad_shape, r"shape \(64, 31\) does not match the model's weight \(64, 32\)")])
def test_corrupt_packed_tensor_is_a_value_error_at_from_pretrained(runs, tmp_path, edit, message):
    folder = _rewrite(runs["u50"] / "sparse", tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        load(folder)


def test_checksum_and_config_mismatch_are_refused(runs, tmp_path):
    sparse = runs["u50"] / "sparse"
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in sparse.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(sparse / "model.safetensors"))
    with safe_open(str(sparse / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    tensors[f"{KEY}@values"] = tensors[f"{KEY}@values"] + 1  # same shapes, altered weights: only the sha256 sees it
    save_file(tensors, str(bad / "model.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="checksums"):
        load(bad)
    (bad / "model.safetensors").write_bytes((sparse / "model.safetensors").read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["packed_modules"].pop()
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="packed_modules does not match"):
        load(bad)


def test_eval_pack_and_inspect_on_packed_folders(runs, tmp_path, capsys):
    text, out = str(runs["text"]), runs["nm24"]
    ppl = []
    for folder in (out, out / "sparse"):
        capsys.readouterr()
        assert main(["eval", str(folder), "--eval", text, "--seqlen", "32", "--eval-windows", "2",
                     "--no-progress"]) == 0
        ppl.append(capsys.readouterr().out.split()[1])
    assert ppl[0] == ppl[1]  # the packed folder evaluates exactly as the masked dense one
    assert main(["pack", str(out), "--output", str(tmp_path / "packed")]) == 0
    assert (tmp_path / "packed" / "tokenizer.json").is_file()
    assert (tmp_path / "packed" / "generation_config.json").is_file()
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "packed")(tokens()).logits, load(out / "sparse")(tokens()).logits)
    summaries = []
    for folder in (out, out / "sparse", tmp_path / "packed"):
        capsys.readouterr()
        assert main(["inspect", str(folder)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert sum("2:4" in line for line in lines) == 14
        summaries.append([line.split("; read from")[0] for line in lines[-2:]])
    # 14 layers of 32x32 (q, o), 16x32 (k, v), 64x32 (gate, up), 32x64 (down) in 2 blocks: 18432 weights, half zero;
    # all parameters add embeddings (64x32, its pad row zero), LM head and norms: 22688
    assert summaries[0][0] == "prunable layers: 14 (14 sparse), sparsity 0.5000 (9216 of 18432 weights are zero)"
    assert summaries[0][1].startswith("all parameters: sparsity 0.4076 (9248 of 22688 are zero)")
    assert summaries[0] == summaries[1] == summaries[2]
