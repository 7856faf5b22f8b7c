"""``MoEMLP``: a gated MLP whose intermediate neurons are split into experts, with a top-k router (MoEfication).

The dense MLP is down(act(gate x) * up x) with I intermediate neurons. Splitting the neurons into disjoint groups makes
the MLP output the SUM of the groups' outputs, so an expert's output is not weighted by the router: the router only
chooses which ``top_k`` of the E routed experts run; an optional shared expert always runs. With top_k = E the module
computes exactly the dense MLP (up to summation order).

Tensors (Ie neurons per routed expert, Is in the shared expert):
    gate_up        (E, 2 Ie, H)  rows [0, Ie) = gate, [Ie, 2Ie) = up: one matmul per expert
    down           (E, H, Ie)
    router_weight  (E, H), router_bias (E,)     score = x @ W.T + b, higher = run
    shared_gate_up (2 Is, H), shared_down (H, Is)  (absent when Is = 0)

Execution: one token (batch-1 decode) runs only the k chosen experts, reading k/E of the routed weights; many tokens
are grouped by expert, each expert running once on all of its tokens.

Router training (``relax`` set to a temperature T): every expert runs, and the hard top-k mask m (1 for the chosen
experts) gets a straight-through gradient from a soft mask sigmoid((s - tau) / (T * std(s))), where tau sits halfway
between the k-th and (k+1)-th score: the forward output is exactly the top-k output, and every expert's score (chosen
or not) receives the gradient <dL/dy, f_e(x)> scaled by the sigmoid's slope.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MoEMLP(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, router_weight: torch.Tensor,
                 router_bias: torch.Tensor, top_k: int, act_fn: nn.Module,
                 shared_gate_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None) -> None:
        super().__init__()
        E, two_ie, H = gate_up.shape
        if not 1 <= top_k <= E:
            raise ValueError(f"top_k must be in [1, {E}] (the number of routed experts), got {top_k}")
        if tuple(down.shape) != (E, H, two_ie // 2) or tuple(router_weight.shape) != (E, H) or router_bias.shape != (E,):
            raise ValueError(f"MoEMLP tensors disagree: gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)}, "
                             f"router {tuple(router_weight.shape)} / {tuple(router_bias.shape)}")
        self.gate_up = nn.Parameter(gate_up.contiguous(), requires_grad=False)
        self.down = nn.Parameter(down.contiguous(), requires_grad=False)
        self.router_weight = nn.Parameter(router_weight.contiguous())
        self.router_bias = nn.Parameter(router_bias.contiguous())
        self.shared_gate_up = None if shared_gate_up is None else nn.Parameter(shared_gate_up.contiguous(),
                                                                               requires_grad=False)
        self.shared_down = None if shared_down is None else nn.Parameter(shared_down.contiguous(), requires_grad=False)
        self.top_k = top_k
        self.act_fn = act_fn
        self.relax: float | None = None  # router-training temperature; None = the exact sparse execution

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def _expert(self, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # (n, Ie) each
        return F.linear(self.act_fn(gate) * up, down)  # (n, H)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, H) -> chosen experts (N, k), highest score first."""
        scores = F.linear(x, self.router_weight, self.router_bias)  # (N, E)
        return scores.topk(self.top_k, dim=-1).indices

    def _relaxed(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Top-k output with a straight-through gradient to every router score (see the module docstring)."""
        ie = self.gate_up.shape[1] // 2
        gu = torch.einsum("nh,eih->nei", x, self.gate_up)  # (N, E, 2Ie)
        y = torch.einsum("nei,ehi->neh", self.act_fn(gu[..., :ie]) * gu[..., ie:], self.down)  # (N, E, H)
        scores = F.linear(x, self.router_weight, self.router_bias)  # (N, E)
        top = scores.topk(min(self.top_k + 1, self.num_experts), dim=-1).values  # (N, k+1)
        kth = top[:, self.top_k - 1:self.top_k]
        tau = (kth + top[:, -1:]) / 2 if self.top_k < self.num_experts else kth - 1.0
        hard = (scores >= kth).to(x.dtype)
        soft = torch.sigmoid((scores - tau.detach()) / (self.relax * scores.detach().std(-1, keepdim=True) + 1e-6))
        mask = hard + soft - soft.detach()  # forward: hard; backward: soft
        return out + (mask[..., None] * y).sum(1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # (N, H)
        out = (self._expert(self.shared_gate_up, self.shared_down, x) if self.shared_gate_up is not None
               else torch.zeros_like(x))
        if self.relax is not None:
            return self._relaxed(x, out).reshape(shape)
        index = self.route(x)  # (N, k)
        if x.shape[0] == 1:  # decode: only the chosen experts' weights are read
            for e in index[0].tolist():
                out = out + self._expert(self.gate_up[e], self.down[e], x)
            return out.reshape(shape)
        for e in range(self.num_experts):  # prefill / batches: each expert once, on its tokens
            token = (index == e).any(dim=-1).nonzero().squeeze(-1)  # (n_e,)
            if token.numel():
                out.index_add_(0, token, self._expert(self.gate_up[e], self.down[e], x[token]))
        return out.reshape(shape)

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate (I, H), up (I, H), down (H, I)) of the equivalent dense MLP: shared neurons first, then expert 0..E-1."""
        ie = self.gate_up.shape[1] // 2
        gates, ups, downs = [self.gate_up[:, :ie].reshape(-1, self.gate_up.shape[2])], \
            [self.gate_up[:, ie:].reshape(-1, self.gate_up.shape[2])], [torch.cat(list(self.down), dim=1)]
        if self.shared_gate_up is not None:
            s = self.shared_gate_up.shape[0] // 2
            gates.insert(0, self.shared_gate_up[:s])
            ups.insert(0, self.shared_gate_up[s:])
            downs.insert(0, self.shared_down)
        return torch.cat(gates), torch.cat(ups), torch.cat(downs, dim=1)

    def extra_repr(self) -> str:
        shared = 0 if self.shared_down is None else self.shared_down.shape[1]
        return (f"experts={self.num_experts}, top_k={self.top_k}, expert_size={self.down.shape[2]}, "
                f"shared_size={shared}, hidden={self.down.shape[1]}")
