"""Remove or merge whole experts of fused MoE layers; the result is a plain, smaller Hugging Face model.

Statistics (one dense pass over calibration tokens, a pre-hook on every fused experts module):

- REAP-style importance (Lasby et al. 2025, "REAP: router-weighted expert activation pruning"): for expert e,

      score_e = mean over tokens t routed to e of  g_e(t) * ||f_e(x_t)||_2

  g_e(t) is the router weight the block multiplies the expert output by, f_e the expert MLP. An expert never routed to
  scores 0. Higher = keep (``score`` convention).
- for merging: every expert's output on a fixed sample of the layer's tokens, compared by cosine similarity of the
  flattened (n, H) outputs; experts are grouped by average-linkage agglomerative clustering, and each group becomes one
  expert whose weights are the routing-frequency-weighted average of its members and whose router row is that of its
  most-routed member (M-SMoE, Li et al. 2023, uses the same "dominant expert" choice).

Removal slices dim 0 of ``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I), the router ``weight`` (E, H) and any
(E,) router tensor (DeepSeek's ``e_score_correction_bias``), then rewrites every ``num_experts`` attribute and the config,
so ``save_pretrained`` writes a folder transformers loads on its own. Exactness: a removed expert that the router never
picks leaves the outputs unchanged for routers that renormalise the top-k weights (Mixtral; Qwen/OLMoE/DeepSeek with
``norm_topk_prob``); without renormalisation the softmax denominator loses that expert's share.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsecraft.moe.fused import _fused_params, find_fused_experts

EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")  # module attrs and config keys
SAMPLE_TOKENS = 256  # tokens per layer kept for output similarity (merging)


# ----------------------------------------------------------------------------------------------- pure math
def reap_contributions(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, output_norms: torch.Tensor,
                       num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of g * ||f||, routed count) per expert, both (E,), from one batch of routing decisions.

    top_k_index (N, k) long; top_k_weights (N, k) the weights applied to the expert outputs; output_norms (N, k)
    ||f_{index[n, j]}(x_n)||_2. Slots with an index outside [0, E) (DeepSeek's masked groups) are ignored.
    """
    valid = (top_k_index >= 0) & (top_k_index < num_experts)
    index = top_k_index[valid]
    contrib = (top_k_weights[valid].double() * output_norms[valid].double())
    sums = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, index.cpu(), contrib.cpu())
    counts = torch.bincount(index.cpu(), minlength=num_experts)
    return sums, counts


def keep_top(scores: torch.Tensor, num_keep: int) -> list[int]:
    """Indices of the ``num_keep`` highest scores, ascending; ties keep the lower index."""
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return sorted(order[:num_keep])


def cluster_experts(outputs: torch.Tensor, num_clusters: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of experts by the cosine distance of their outputs.

    outputs (E, n, H): every expert on the same n tokens. -> ``num_clusters`` groups of expert indices, each sorted,
    ordered by their smallest member. Ties merge the pair with the lowest indices first.
    """
    E = outputs.shape[0]
    flat = nn.functional.normalize(outputs.reshape(E, -1).double(), dim=1)  # (E, n*H)
    dist = 1.0 - flat @ flat.T  # (E, E)
    groups = [[e] for e in range(E)]
    while len(groups) > num_clusters:
        best, pair = None, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                d = float(dist[groups[a]][:, groups[b]].mean())
                if best is None or d < best - 1e-12:
                    best, pair = d, (a, b)
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups)


def merge_weights(stack: torch.Tensor, groups: list[list[int]], frequency: torch.Tensor) -> torch.Tensor:
    """(E, ...) -> (len(groups), ...): frequency-weighted mean within each group (uniform if no member was used)."""
    out = []
    for g in groups:
        w = frequency[g].double()
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(g))
        out.append((stack[g].double() * w.view(-1, *[1] * (stack.ndim - 1))).sum(0).to(stack.dtype))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------- statistics
def expert_output(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) for a fused experts module: down[e] @ (act(gate[e] x) * up[e] x); x (n, H) -> (n, H)."""
    gate_up, down = _fused_params(experts)
    gate, up = nn.functional.linear(x, gate_up[e]).chunk(2, dim=-1)  # (n, I) each
    return nn.functional.linear(experts.act_fn(gate) * up, down[e])


@dataclass
class ExpertStats:
    """Accumulated over calibration batches for one MoE layer with E experts."""

    num_experts: int
    score_sum: torch.Tensor = field(init=False)  # (E,) float64: sum over routed tokens of g * ||f||
    routed: torch.Tensor = field(init=False)  # (E,) long: tokens routed to each expert
    weight_sum: torch.Tensor = field(init=False)  # (E,) float64: sum of router weights (soft routing frequency)
    sample: list[torch.Tensor] = field(default_factory=list)  # layer inputs kept for output similarity

    def __post_init__(self) -> None:
        self.score_sum = torch.zeros(self.num_experts, dtype=torch.float64)
        self.routed = torch.zeros(self.num_experts, dtype=torch.long)
        self.weight_sum = torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def scores(self) -> torch.Tensor:
        """REAP score per expert (E,); 0 for experts never routed to."""
        return torch.where(self.routed > 0, self.score_sum / self.routed.clamp(min=1), torch.zeros_like(self.score_sum))

    def add_batch(self, experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                  sample_tokens: int) -> None:
        """hidden (N, H), index / weights (N, k): the experts module's own inputs."""
        norms = torch.zeros(index.shape, dtype=torch.float32, device=hidden.device)  # (N, k)
        for e in range(self.num_experts):
            token, slot = torch.where(index == e)
            if token.numel():
                norms[token, slot] = expert_output(experts, e, hidden[token]).float().norm(dim=-1)
        sums, counts = reap_contributions(index, weights, norms, self.num_experts)
        self.score_sum += sums
        self.routed += counts
        valid = index < self.num_experts
        self.weight_sum.index_add_(0, index[valid].cpu(), weights[valid].double().cpu())
        have = sum(s.shape[0] for s in self.sample)
        if have < sample_tokens:
            self.sample.append(hidden[: sample_tokens - have].detach().cpu())

    @torch.no_grad()
    def outputs(self, experts: nn.Module) -> torch.Tensor:
        """Every expert on the sampled tokens: (E, n, H)."""
        x = torch.cat(self.sample).to(_fused_params(experts)[0].device, _fused_params(experts)[0].dtype)
        return torch.stack([expert_output(experts, e, x).float().cpu() for e in range(self.num_experts)])


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args):]]
    return values[0], values[1], values[2]


@contextmanager
def _collecting(model: nn.Module, sample_tokens: int) -> Iterator[dict[str, ExpertStats]]:
    stats: dict[str, ExpertStats] = {}
    handles = []

    def hook(fqn: str):
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, index, weights = _split_call(args, kwargs)
            stats[fqn].add_batch(module, hidden, index, weights, sample_tokens)
        return pre

    try:
        for fqn, module in find_fused_experts(model).items():
            stats[fqn] = ExpertStats(_fused_params(module)[0].shape[0])
            handles.append(module.register_forward_pre_hook(hook(fqn), with_kwargs=True))
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def expert_statistics(model: nn.Module, calibration: torch.Tensor, batch_size: int = 4,
                      sample_tokens: int = SAMPLE_TOKENS) -> dict[str, ExpertStats]:
    """REAP scores, routed counts and a token sample per fused MoE layer, from dense passes over ``calibration``.

    calibration (nsamples, seqlen) token ids. Raises ValueError on a model without fused experts.
    """
    if not find_fused_experts(model):
        raise ValueError("the model has no fused MoE experts (3-D gate_up_proj / down_proj); expert pruning and "
                         "merging need an MoE model such as Mixtral, Qwen-MoE, OLMoE or DeepSeek-V3")
    device = next(model.parameters()).device
    with _collecting(model, sample_tokens) as stats:
        for i in range(0, calibration.shape[0], batch_size):
            model(calibration[i:i + batch_size].to(device))
    return stats


# ----------------------------------------------------------------------------------------------- model surgery
def _router(model: nn.Module, experts_fqn: str, num_experts: int) -> nn.Module:
    """The sibling module of the experts whose ``weight`` is (E, H): the router (``gate`` / ``router``)."""
    block_fqn = experts_fqn.rpartition(".")[0]
    block = model.get_submodule(block_fqn) if block_fqn else model
    hidden = _fused_params(model.get_submodule(experts_fqn))[0].shape[2]
    for name, child in block.named_children():
        w = getattr(child, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) == (num_experts, hidden):
            return child
    raise ValueError(f"no router with a ({num_experts}, {hidden}) weight beside {experts_fqn}; this MoE layout is not "
                     f"supported for expert removal yet (open an issue with the model id)")


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, value.contiguous(), persistent=name not in module._non_persistent_buffers_set)


def _rebuild_layer(model: nn.Module, fqn: str, gate_up: torch.Tensor, down: torch.Tensor,
                   router_rows: dict[str, torch.Tensor]) -> None:
    """Install the new (E', ...) expert tensors and router tensors of one MoE layer."""
    experts = model.get_submodule(fqn)
    router = _router(model, fqn, _fused_params(experts)[0].shape[0])
    _set_tensor(experts, "gate_up_proj", gate_up)
    _set_tensor(experts, "down_proj", down)
    for name, value in router_rows.items():
        _set_tensor(router, name, value)


def _router_tensors(router: nn.Module, num_experts: int) -> dict[str, torch.Tensor]:
    """Every direct tensor of the router with E rows: weight (E, H), biases / correction biases (E,)."""
    return {n: t for n, t in [*router.named_parameters(recurse=False), *router.named_buffers(recurse=False)]
            if t.ndim >= 1 and t.shape[0] == num_experts}


def _set_expert_count(model: nn.Module, old: int, new: int) -> None:
    """Rewrite every module attribute and config key that holds the expert count."""
    for module in model.modules():
        for attr in EXPERT_COUNT_ATTRS:
            if getattr(module, attr, None) == old and isinstance(getattr(module, attr), int):
                setattr(module, attr, new)
    configs = [model.config, getattr(model.config, "text_config", None)]
    for cfg in (c for c in configs if c is not None):
        for attr in EXPERT_COUNT_ATTRS:
            if getattr(cfg, attr, None) == old:
                setattr(cfg, attr, new)


def _check_counts(model: nn.Module, new_counts: dict[str, int]) -> tuple[int, int]:
    fused = find_fused_experts(model)
    olds = {_fused_params(m)[0].shape[0] for m in fused.values()}
    news = set(new_counts.values())
    if set(new_counts) != set(fused):
        missing = sorted(set(fused) - set(new_counts)) or sorted(set(new_counts) - set(fused))
        raise ValueError(f"the plan must name every MoE layer exactly once; mismatch at {missing[:3]}")
    if len(olds) != 1 or len(news) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts (a Hugging Face config holds one "
                         f"count); got {sorted(news)}")
    old, new = olds.pop(), news.pop()
    top_k = getattr(model.config, "num_experts_per_tok", 1)
    groups = getattr(model.config, "n_group", None) or 1
    if not top_k <= new <= old or new % groups:
        raise ValueError(f"cannot keep {new} of {old} experts: keep between num_experts_per_tok={top_k} and {old}, "
                         f"and a multiple of n_group={groups}")
    return old, new


@torch.no_grad()
def remove_experts_(model: nn.Module, keep: dict[str, list[int]]) -> None:
    """Keep only the listed experts of every fused MoE layer (fqn -> sorted expert indices), in place."""
    old, new = _check_counts(model, {f: len(k) for f, k in keep.items()})
    for fqn, kept in keep.items():
        if sorted(set(kept)) != list(kept) or not all(0 <= e < old for e in kept):
            raise ValueError(f"experts to keep at {fqn} must be sorted, unique and in [0, {old}); got {kept}")
        experts = model.get_submodule(fqn)
        gate_up, down = _fused_params(experts)
        idx = torch.tensor(kept, device=gate_up.device)
        router = _router(model, fqn, old)
        rows = {n: t.detach().index_select(0, idx.to(t.device)) for n, t in _router_tensors(router, old).items()}
        _rebuild_layer(model, fqn, gate_up.detach().index_select(0, idx), down.detach().index_select(0, idx), rows)
    _set_expert_count(model, old, new)


@torch.no_grad()
def merge_experts_(model: nn.Module, groups: dict[str, list[list[int]]], frequency: dict[str, torch.Tensor]) -> None:
    """Merge each group of experts into one, in place; fqn -> groups (a partition of range(E)), fqn -> (E,) usage.

    Weights: frequency-weighted mean of the members. Router rows: the most-used member's (ties: lowest index).
    """
    old, new = _check_counts(model, {f: len(g) for f, g in groups.items()})
    for fqn, gs in groups.items():
        if sorted(e for g in gs for e in g) != list(range(old)):
            raise ValueError(f"expert groups at {fqn} must partition range({old}); got {gs}")
        freq = frequency[fqn].double().cpu()
        gate_up, down = _fused_params(model.get_submodule(fqn))
        router = _router(model, fqn, old)
        lead = torch.tensor([max(g, key=lambda e: (float(freq[e]), -e)) for g in gs])
        rows = {n: t.detach().index_select(0, lead.to(t.device)) for n, t in _router_tensors(router, old).items()}
        _rebuild_layer(model, fqn, merge_weights(gate_up.detach(), gs, freq), merge_weights(down.detach(), gs, freq),
                       rows)
    _set_expert_count(model, old, new)


# ----------------------------------------------------------------------------------------------- one-call API
@dataclass(frozen=True)
class ExpertConfig:
    """``prune`` removes the lowest-REAP experts, ``merge`` clusters experts by output similarity and averages them."""

    action: str = "prune"  # prune | merge
    keep: int = 0  # experts left per layer (every layer the same: a HF config holds one count)
    batch_size: int = 4
    sample_tokens: int = SAMPLE_TOKENS  # per layer, for the output similarity of merging

    def __post_init__(self) -> None:
        if self.action not in ("prune", "merge"):
            raise ValueError(f"action must be 'prune' or 'merge', got {self.action!r}")
        if self.keep < 1:
            raise ValueError(f"keep must be the number of experts to keep per layer (>= 1), got {self.keep}")
        if self.sample_tokens < 1 or self.batch_size < 1:
            raise ValueError("sample_tokens and batch_size must be >= 1")


@dataclass
class ExpertResult:
    """What was kept or merged, per MoE layer fqn, with the statistics that decided it."""

    action: str
    num_experts: int
    kept: int
    groups: dict[str, list[list[int]]]  # prune: singletons of the kept experts; merge: the clusters
    scores: dict[str, list[float]]
    routed_tokens: dict[str, list[int]]

    def as_dict(self) -> dict:
        return {"action": self.action, "num_experts": self.num_experts, "kept": self.kept, "groups": self.groups,
                "scores": self.scores, "routed_tokens": self.routed_tokens}


def reduce_experts(model: nn.Module, calibration: torch.Tensor, config: ExpertConfig) -> ExpertResult:
    """Calibrate, then remove (REAP) or merge experts in place so every MoE layer has ``config.keep`` experts."""
    stats = expert_statistics(model, calibration, config.batch_size, config.sample_tokens)
    num = next(iter(stats.values())).num_experts
    _check_counts(model, {f: config.keep for f in stats})
    if config.action == "prune":
        keep = {f: keep_top(s.scores, config.keep) for f, s in stats.items()}
        groups = {f: [[e] for e in k] for f, k in keep.items()}
        remove_experts_(model, keep)
    else:
        modules = find_fused_experts(model)
        groups = {f: cluster_experts(s.outputs(modules[f]), config.keep) for f, s in stats.items()}
        merge_experts_(model, groups, {f: s.weight_sum for f, s in stats.items()})
    return ExpertResult(config.action, num, config.keep, groups, {f: s.scores.tolist() for f, s in stats.items()},
                        {f: s.routed.tolist() for f, s in stats.items()})
