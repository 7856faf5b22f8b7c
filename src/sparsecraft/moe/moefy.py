"""Dense -> MoE (MoEfication, Zhang et al. 2022; LLaMA-MoE 2024): split each gated MLP's neurons into experts.

Per MLP, on calibration tokens x (N, H) flowing through the DENSE model:

1. neuron activations a = act(gate x) * up x                                   (N, I)
2. shared expert (optional): the ``shared_experts * I/E`` neurons with the largest mean |a_i| * ||down[:, i]||
3. the other neurons are clustered by co-activation: neuron i is the unit vector |a_i| / || |a_i| || over the N tokens;
   balanced spherical k-means puts exactly I_r / E_r neurons in each of the E_r routed experts (equal sizes keep the
   batch-1 cost of every expert the same)
4. router, scoring each routed expert per token (higher = run):
   - "lstsq": a ridge-regression linear map x -> ||f_e(x)||_2, the norm of the expert's true output (N, E_r)
   - "centroid": the mean of the expert's gate rows (MoEfication's similarity selection, no fitting)
5. the MLP is swapped for a ``MoEMLP`` (top-k of the routed experts + the shared one).

Saving writes the DENSE model with neurons permuted so each expert is a contiguous slice (a valid checkpoint that
plain transformers loads and whose outputs equal the original dense model), plus ``moe.safetensors`` with the routers
and the sizes; ``load_moefied`` rebuilds the MoE model from both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from sparsecraft.io import atomic_save_tensors
from sparsecraft.models import load_model
from sparsecraft.modules.moe_mlp import MoEMLP
from sparsecraft.modules.swap import swap_module_

ROUTERS = ("lstsq", "centroid")
MOE_FILE = "moe.safetensors"
FORMAT = "sparsecraft.moefy.v1"


@dataclass(frozen=True)
class MoEfyConfig:
    num_experts: int = 8  # E: equal neuron groups per MLP, the shared ones included
    top_k: int = 2  # routed experts run per token
    shared_experts: int = 0  # groups that always run (the most important neurons); routed = E - shared
    router: str = "lstsq"  # lstsq | centroid
    iterations: int = 20  # balanced k-means rounds (stops early when assignments stop changing)
    max_tokens: int = 4096  # calibration tokens per MLP used to cluster and fit the router
    ridge: float = 1e-3  # lstsq: ridge strength relative to the mean diagonal of X^T X
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 0 <= self.shared_experts < self.num_experts:
            raise ValueError(f"need num_experts >= 1 and 0 <= shared_experts < num_experts, got "
                             f"{self.num_experts} and {self.shared_experts}")
        if not 1 <= self.top_k <= self.num_experts - self.shared_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts - self.shared_experts}] (the routed experts), "
                             f"got {self.top_k}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.iterations < 1 or self.max_tokens < 1 or self.ridge < 0:
            raise ValueError("iterations and max_tokens must be >= 1 and ridge >= 0")

    @property
    def active_fraction(self) -> float:
        """Fraction of the MLP neurons that run per token."""
        return (self.shared_experts + self.top_k) / self.num_experts


# ----------------------------------------------------------------------------------------------- pure math
def _balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy balanced assignment: the most similar (item, cluster) pairs first, each cluster takes ``capacity``."""
    n, C = sim.shape
    labels = [-1] * n  # Python lists: this loop visits up to n * C pairs, tensor indexing would dominate
    room = [capacity] * C
    done = 0
    for flat in sim.flatten().argsort(descending=True, stable=True).tolist():
        i, c = divmod(flat, C)
        if labels[i] < 0 and room[c]:
            labels[i] = c
            room[c] -= 1
            done += 1
            if done == n:
                break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(features: torch.Tensor, num_clusters: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Spherical k-means with equal cluster sizes. features (n, d) -> labels (n,), clusters numbered by their
    smallest member. n must be a multiple of ``num_clusters``."""
    n = features.shape[0]
    if n % num_clusters:
        raise ValueError(f"cannot split {n} neurons into {num_clusters} equal experts; choose a number of experts "
                         f"that divides it")
    f = F.normalize(features.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = f[torch.randperm(n, generator=g)[:num_clusters]]  # (C, d)
    labels = None
    for _ in range(iterations):
        new = _balanced_assign(f @ centroids.T, n // num_clusters)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        members = F.one_hot(labels, num_clusters).T.to(f.dtype)  # (C, n)
        centroids = F.normalize(members @ f, dim=1)  # the direction of each cluster's mean
    first = [int((labels == c).nonzero()[0]) for c in range(num_clusters)]
    rank = torch.empty(num_clusters, dtype=torch.long)
    rank[torch.tensor(sorted(range(num_clusters), key=first.__getitem__))] = torch.arange(num_clusters)
    return rank[labels]


def fit_router(x: torch.Tensor, target: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression target (N, E) ~ x (N, H) @ W.T + b -> (W (E, H), b (E,)); ridge relative to mean diag."""
    X = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)  # (N, H+1)
    A = X.T @ X
    A += ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=torch.float64)
    beta = torch.linalg.solve(A, X.T @ target.double())  # (H+1, E)
    return beta[:-1].T.contiguous(), beta[-1].contiguous()


# ----------------------------------------------------------------------------------------------- one MLP
def find_gated_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """fqn -> gated MLP (gate_proj, up_proj, down_proj bias-free Linears and act_fn), LLaMA / Qwen2 / Mistral style."""
    found = {}
    for fqn, m in model.named_modules():
        lin = [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if all(isinstance(l, nn.Linear) and l.bias is None for l in lin) and hasattr(m, "act_fn"):
            found[fqn] = m
    return found


@dataclass
class LayerPlan:
    order: torch.Tensor  # (I,) neuron indices: shared ones first, then expert 0, 1, ...
    shared_size: int
    expert_size: int
    router_weight: torch.Tensor  # (E_r, H)
    router_bias: torch.Tensor  # (E_r,)
    recall: float = 0.0  # calibration: fraction of the router's choices among the top-k experts by output norm


def _expert_norms(mlp: nn.Module, a: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """||f_e(x)|| for every routed expert: a (N, I) activations, groups (E_r, Ie) neuron ids -> (N, E_r)."""
    down = mlp.down_proj.weight.detach()  # (H, I)
    return torch.stack([(a[:, g] @ down[:, g].T).norm(dim=-1) for g in groups], dim=1)


def plan_layer(mlp: nn.Module, x: torch.Tensor, config: MoEfyConfig) -> LayerPlan:
    """Partition one MLP's neurons and build its router from calibration inputs x (N, H)."""
    gate, up, down = (mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach())
    I = gate.shape[0]
    if I % config.num_experts:
        raise ValueError(f"{I} MLP neurons do not split into {config.num_experts} equal experts; choose a divisor")
    size = I // config.num_experts
    a = (mlp.act_fn(x @ gate.T) * (x @ up.T)).float()  # (N, I)
    importance = a.abs().mean(0) * down.norm(dim=0)  # (I,)
    ranked = importance.argsort(descending=True, stable=True)
    shared = ranked[: config.shared_experts * size].sort().values
    rest = ranked[config.shared_experts * size:].sort().values  # (I_r,)
    routed = config.num_experts - config.shared_experts
    labels = balanced_kmeans(a[:, rest].abs().T, routed, config.iterations, config.seed)  # (I_r,)
    groups = torch.stack([rest[labels == c] for c in range(routed)])  # (E_r, Ie)
    norms = _expert_norms(mlp, a, groups)  # (N, E_r)
    if config.router == "lstsq":
        weight, bias = fit_router(x, norms, config.ridge)
    else:
        weight, bias = torch.stack([gate[g].mean(0) for g in groups]).double(), torch.zeros(routed, dtype=torch.float64)
    chosen = (x.double() @ weight.T + bias).topk(config.top_k, dim=-1).indices
    best = norms.topk(config.top_k, dim=-1).indices
    recall = (chosen[:, :, None] == best[:, None, :]).any(-1).float().mean().item()
    return LayerPlan(torch.cat([shared, groups.flatten()]), shared.numel(), size, weight.to(gate.dtype),
                     bias.to(gate.dtype), recall)


def build_moe_mlp(mlp: nn.Module, plan: LayerPlan, top_k: int) -> MoEMLP:
    """A MoEMLP holding the MLP's weights regrouped by ``plan`` (copies; the dense MLP is left as it was)."""
    gate, up, down = (mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach())
    s, ie = plan.shared_size, plan.expert_size
    routed = plan.order[s:].view(-1, ie)  # (E_r, Ie)
    gate_up = torch.cat([gate[routed], up[routed]], dim=1)  # (E_r, 2Ie, H)
    down_e = down[:, routed].permute(1, 0, 2)  # (E_r, H, Ie)
    shared = plan.order[:s]
    return MoEMLP(gate_up, down_e, plan.router_weight, plan.router_bias, top_k, mlp.act_fn,
                  torch.cat([gate[shared], up[shared]]) if s else None, down[:, shared] if s else None)


# ----------------------------------------------------------------------------------------------- whole model
@torch.no_grad()
def mlp_inputs(model: nn.Module, calibration: torch.Tensor, fqns: list[str], max_tokens: int,
               batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Inputs of the named MLPs in dense passes: fqn -> (N <= max_tokens, H) on the model's device."""
    seen: dict[str, list[torch.Tensor]] = {f: [] for f in fqns}

    def hook(fqn: str):
        def pre(module: nn.Module, args: tuple) -> None:
            have = sum(t.shape[0] for t in seen[fqn])
            if have < max_tokens:
                seen[fqn].append(args[0].reshape(-1, args[0].shape[-1])[: max_tokens - have].detach())
        return pre

    handles = [model.get_submodule(f).register_forward_pre_hook(hook(f)) for f in fqns]
    try:
        device = next(model.parameters()).device
        for i in range(0, calibration.shape[0], batch_size):
            model(calibration[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {f: torch.cat(v) for f, v in seen.items()}


@dataclass
class MoEfyResult:
    config: MoEfyConfig
    plans: dict[str, LayerPlan] = field(default_factory=dict)

    def as_dict(self) -> dict:
        recall = [p.recall for p in self.plans.values()]
        return {"config": asdict(self.config), "layers": len(self.plans),
                "active_fraction": self.config.active_fraction,
                "router_recall_mean": sum(recall) / max(len(recall), 1),
                "router_recall": {f: p.recall for f, p in self.plans.items()}}


@torch.no_grad()
def moefy_(model: nn.Module, calibration: torch.Tensor, config: MoEfyConfig,
           include: list[str] | None = None, inputs: dict[str, torch.Tensor] | None = None) -> MoEfyResult:
    """Swap every gated MLP (or the fqns in ``include``) for a MoEMLP planned on ``calibration`` (n, seqlen).

    ``inputs`` (fqn -> (N, H), from ``mlp_inputs``) skips the calibration pass, e.g. to convert one model several
    ways; it is not modified."""
    mlps = find_gated_mlps(model)
    if not mlps:
        raise ValueError("no gated MLP (gate_proj / up_proj / down_proj without bias) found; moefy supports "
                         "LLaMA-style models (Llama, Qwen2, Mistral, Gemma, SmolLM)")
    fqns = include if include is not None else list(mlps)
    unknown = [f for f in fqns if f not in mlps]
    if unknown:
        raise ValueError(f"not gated MLPs: {unknown[:3]}; valid fqns look like {next(iter(mlps))}")
    if inputs is None:
        inputs = mlp_inputs(model, calibration, fqns, config.max_tokens)
    result = MoEfyResult(config)
    for fqn in fqns:
        result.plans[fqn] = plan_layer(mlps[fqn], inputs[fqn][: config.max_tokens], config)
        swap_module_(model, fqn, build_moe_mlp(mlps[fqn], result.plans[fqn], config.top_k))
    return result


def set_top_k_(model: nn.Module, top_k: int) -> None:
    """Change how many routed experts run in every MoEMLP (no re-planning needed)."""
    for m in model.modules():
        if isinstance(m, MoEMLP):
            if not 1 <= top_k <= m.num_experts:
                raise ValueError(f"top_k must be in [1, {m.num_experts}], got {top_k}")
            m.top_k = top_k


# ----------------------------------------------------------------------------------------------- save / load
class _GatedMLP(nn.Module):
    """The dense MLP of a MoEMLP with the state-dict keys of a LLaMA MLP, for saving."""

    def __init__(self, moe: MoEMLP) -> None:
        super().__init__()
        gate, up, down = moe.dense_weights()
        for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=False)
            setattr(self, name, lin)


@contextmanager
def _dense_view(model: nn.Module) -> Iterator[dict[str, MoEMLP]]:
    moes = {f: m for f, m in model.named_modules() if isinstance(m, MoEMLP)}
    try:
        for fqn, moe in moes.items():
            swap_module_(model, fqn, _GatedMLP(moe))
        yield moes
    finally:
        for fqn, moe in moes.items():
            swap_module_(model, fqn, moe)


def save_moefied(model: nn.Module, folder: str | Path) -> None:
    """Write the permuted dense checkpoint (``save_pretrained``) and ``moe.safetensors`` (routers + sizes)."""
    folder = Path(folder)
    with _dense_view(model) as moes:
        if not moes:
            raise ValueError("the model has no MoEMLP; run moefy_ first")
        model.save_pretrained(folder)
    tensors, meta = {}, {}
    for fqn, m in moes.items():
        tensors[f"{fqn}.router_weight"], tensors[f"{fqn}.router_bias"] = m.router_weight, m.router_bias
        meta[fqn] = {"top_k": m.top_k, "experts": m.num_experts, "expert_size": m.down.shape[2],
                     "shared_size": 0 if m.shared_down is None else m.shared_down.shape[1]}
    atomic_save_tensors(tensors, folder / MOE_FILE, metadata={"format": FORMAT, "layers": json.dumps(meta)})


def attach_moe_(model: nn.Module, folder: str | Path) -> None:
    """Swap the (permuted) dense MLPs of a model loaded from a ``save_moefied`` folder for their MoEMLPs."""
    path = Path(folder) / MOE_FILE
    if not path.is_file():
        raise ValueError(f"{folder} has no {MOE_FILE}; it was not written by `sparsecraft moe moefy`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file (format={meta.get('format')!r})")
        layers = json.loads(meta["layers"])
        mlps = find_gated_mlps(model)
        for fqn, info in layers.items():
            if fqn not in mlps:
                raise ValueError(f"{path} names {fqn}, which is not a gated MLP of this model")
            mlp = mlps[fqn]
            plan = LayerPlan(torch.arange(mlp.gate_proj.weight.shape[0]), info["shared_size"], info["expert_size"],
                             f.get_tensor(f"{fqn}.router_weight").to(mlp.gate_proj.weight.dtype),
                             f.get_tensor(f"{fqn}.router_bias").to(mlp.gate_proj.weight.dtype))
            moe = build_moe_mlp(mlp, plan, info["top_k"])
            swap_module_(model, fqn, moe.to(mlp.gate_proj.weight.device))


def load_moefied(folder: str | Path, dtype: torch.dtype | str | None = torch.float32, device: str = "cpu"):
    """(model with MoEMLPs, tokenizer) from a ``save_moefied`` folder."""
    model, tok = load_model(str(folder), dtype, device)
    attach_moe_(model, folder)
    return model, tok
