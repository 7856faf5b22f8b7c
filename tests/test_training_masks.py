"""MaskState: exact zeros under SGD+momentum / Adam / AdamW, state-dict round trip, clean removal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsecraft.training import KEEP_BUFFER, MaskState, maskable_modules

torch.set_num_threads(1)


class Tiny(nn.Module):
    def __init__(self, sparse_embedding: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8, sparse=sparse_embedding)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(8 + 4 * 4 * 4, 5)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        e = self.emb(tokens).mean(1)  # (B, 8)
        c = torch.relu(self.conv(image)).flatten(1)  # (B, 64)
        return self.fc(torch.cat([e, c], 1))


def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 12, (6, 3), generator=g)
    return tokens, torch.randn(6, 1, 4, 4, generator=g), torch.randint(0, 5, (6,), generator=g)


def random_masks(model: nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {fqn: torch.rand(model.get_submodule(fqn).weight.shape, generator=g) > 0.5 for fqn in maskable_modules(model)}


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, g: torch.Generator) -> None:
    for _ in range(steps):
        tokens, image, y = batch(g)
        loss = nn.functional.cross_entropy(model(tokens, image), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masked_weights_stay_exactly_zero(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Tiny()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 5, g)  # dense warm-up: the optimizer has nonzero moments everywhere
    masks = random_masks(model, g)
    state = MaskState(model, keep=masks).bind(opt)
    before = {fqn: state.weight(fqn).detach().clone() for fqn in state.fqns}
    train(model, opt, 60, g)
    for fqn, keep in masks.items():
        w = state.weight(fqn).detach()
        assert torch.count_nonzero(w[~keep]) == 0, fqn  # exactly zero, not small
        assert not torch.equal(w[keep], before[fqn][keep]), fqn  # the kept weights did train
        assert torch.count_nonzero(state.weight(fqn).grad[~keep]) == 0  # gradients masked too
    assert state.zeros() == {fqn: int((~k).sum()) for fqn, k in masks.items()}


def test_sparse_embedding_gradients_are_masked() -> None:
    g = torch.Generator().manual_seed(1)
    model = Tiny(sparse_embedding=True)
    masks = random_masks(model, g)
    state = MaskState(model, keep={"emb": masks["emb"]})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state.bind(opt)
    train(model, opt, 10, g)
    assert torch.count_nonzero(model.emb.weight.detach()[~masks["emb"]]) == 0
    assert torch.count_nonzero(model.emb.weight.detach()[masks["emb"]]) == int(masks["emb"].sum())


def test_state_dict_round_trip_and_dtype_move() -> None:
    g = torch.Generator().manual_seed(2)
    model = Tiny()
    masks = random_masks(model, g)
    MaskState(model, keep=masks)
    sd = model.state_dict()
    assert all(torch.equal(sd[f"{fqn}.{KEEP_BUFFER}"], k) for fqn, k in masks.items())
    fresh = Tiny()
    restored = MaskState.from_state_dict(fresh, sd)
    fresh.load_state_dict(sd)
    assert all(torch.equal(restored.keep(fqn), k) for fqn, k in masks.items())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))
    fresh.double()  # .to() moves the buffers along; bool masks keep their dtype
    assert restored.keep("fc").dtype == torch.bool and restored.weight("fc").dtype == torch.float64
    tokens, image, y = batch(g)
    nn.functional.cross_entropy(fresh(tokens, image.double()), y).backward()
    assert torch.count_nonzero(fresh.fc.weight.grad[~masks["fc"]]) == 0


def test_remove_takes_hooks_and_buffers_off() -> None:
    g = torch.Generator().manual_seed(3)
    model = Tiny()
    masks = random_masks(model, g)
    with MaskState(model, keep=masks) as state:
        zeros = sum(int((~k).sum()) for k in masks.values())
        assert state.sparsity() == zeros / sum(k.numel() for k in masks.values())
    assert not any(k.endswith(KEEP_BUFFER) for k in model.state_dict())
    tokens, image, y = batch(g)
    nn.functional.cross_entropy(model(tokens, image), y).backward()
    assert torch.count_nonzero(model.fc.weight.grad[~masks["fc"]]) > 0  # no gradient hook left


def test_bad_mask_says_how_to_fix() -> None:
    model = Tiny()
    with pytest.raises(ValueError, match="torch.bool tensor of shape"):
        MaskState(model, keep={"fc": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="add them to fqns"):
        MaskState(model, keep={"fc": torch.ones(5, 72, dtype=torch.bool)}, fqns=["conv"])
