"""Where each structure lives in each supported architecture, and which config keys describe its size.

A structure is a set of output rows in its *producers* and input columns in its *consumers*:
- an MLP neuron j: row j of every ``mlp_in`` layer (gate, up / fc1), column j of ``mlp_out`` (down / fc2);
- an attention KV group g: the rows of its query heads in ``q``, of its KV head in ``k`` and ``v``, and the same
  query-head columns in ``o``. Whole groups go, so grouped-query attention stays valid (every KV head keeps its
  ``num_attention_heads // num_key_value_heads`` query heads);
- a hidden channel c: column c of every layer reading the residual stream (q, k, v, mlp_in, lm_head), row c of every
  layer writing it (o, mlp_out), entry c of every norm on it and of the token embedding.

Heads and hidden channels need a config with an explicit ``head_dim``: GPT-2, OPT and GPT-NeoX derive the head size
from ``hidden_size // num_attention_heads``, so removing a head or a channel cannot be expressed in their configs;
they are refused clearly for those axes (MLP neurons and depth work).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

AXES = ("mlp", "heads", "hidden", "depth")


@dataclass(frozen=True)
class ArchSpec:
    mlp_in: tuple[str, ...]  # block-relative fqns of the layers whose output rows are the MLP neurons
    mlp_out: str  # block-relative fqn of the layer whose input columns are the MLP neurons
    ffn_key: str  # config key of the MLP width
    q: str | None = None  # attention projections, block-relative (None: heads/hidden unsupported)
    k: str | None = None
    v: str | None = None
    o: str | None = None
    norms: tuple[str, ...] = ()  # block-relative norms on the residual stream
    embed: str | None = None  # model-relative token embedding
    final_norm: str | None = None  # model-relative
    lm_head: str = "lm_head"
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    embed_scaled: bool = False  # Gemma multiplies the embeddings by sqrt(hidden_size), read from the config
    rms_norm: bool = False  # rotation (SliceGPT) needs a norm without mean subtraction
    mlp_bias_key: str | None = None  # config flag that adds the MLP biases FLAP compensates into, if any
    attn_bias_key: str | None = None  # config flag that adds the attention biases, if any
    why_no_width: str = ""  # the reason heads/hidden are refused, for the error message

    @property
    def width_ok(self) -> bool:
        return self.q is not None

    @property
    def readers(self) -> tuple[str, ...]:
        """Block layers reading the residual stream (through a norm)."""
        return (self.q, self.k, self.v, *self.mlp_in) if self.q else ()  # type: ignore[return-value]

    @property
    def writers(self) -> tuple[str, ...]:
        return (self.o, self.mlp_out) if self.o else ()  # type: ignore[return-value]


_LLAMA = dict(mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj", ffn_key="intermediate_size",
              q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
              norms=("input_layernorm", "post_attention_layernorm"), embed="model.embed_tokens",
              final_norm="model.norm", rms_norm=True)
_DERIVED = "its config derives the head size from hidden_size // num_attention_heads"

SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec(**_LLAMA, mlp_bias_key="mlp_bias", attn_bias_key="attention_bias"),
    "mistral": ArchSpec(**_LLAMA),
    "qwen2": ArchSpec(**_LLAMA),
    "gemma": ArchSpec(**_LLAMA, norm_offset=1.0, embed_scaled=True),
    "phi": ArchSpec(mlp_in=("mlp.fc1",), mlp_out="mlp.fc2", ffn_key="intermediate_size", q="self_attn.q_proj",
                    k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.dense", norms=("input_layernorm",),
                    embed="model.embed_tokens", final_norm="model.final_layernorm"),
    "gpt2": ArchSpec(mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", ffn_key="n_inner", why_no_width=_DERIVED),
    "opt": ArchSpec(mlp_in=("fc1",), mlp_out="fc2", ffn_key="ffn_dim", why_no_width=_DERIVED),
    "gpt_neox": ArchSpec(mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h", ffn_key="intermediate_size",
                         why_no_width=_DERIVED),
}


def spec_for(model: nn.Module, axes: tuple[str, ...] = ("mlp",)) -> ArchSpec:
    """The structure map of ``model``; refuses an unknown architecture or an axis its config cannot express."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in SPECS:
        raise ValueError(f"architecture {kind!r} has no known config mapping for structured pruning; supported: "
                         f"{', '.join(sorted(SPECS))}. Add an ArchSpec to sparsecraft.structured.arch.SPECS")
    spec = SPECS[kind]
    bad = [a for a in axes if a in ("heads", "hidden") and not spec.width_ok]
    if bad:
        raise ValueError(f"{kind} cannot lose {' or '.join(bad)}: {spec.why_no_width}, so the result would not "
                         f"load. Use --axes mlp,depth for {kind}")
    return spec


def ffn_width(config: object, spec: ArchSpec) -> int:
    value = getattr(config, spec.ffn_key, None)
    return int(value) if value is not None else 4 * int(config.hidden_size)  # GPT-2: n_inner None means 4 * n_embd


def head_dim(config: object) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def kv_heads(config: object) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
