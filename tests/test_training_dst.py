"""SET / RigL: exact drop-and-grow counts, constant density, zero-initialised regrowth, reset moments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsecraft.patterns import num_pruned
from sparsecraft.allocation import erk
from sparsecraft.training import MAX_TRAINING_SPARSITY, DropAndGrow, DropAndGrowConfig, MaskState, drop_and_grow_keep, drop_fraction_at
from sparsecraft.training.dst import is_update_step

torch.set_num_threads(1)


def test_drop_and_grow_golden() -> None:
    weight = torch.tensor([[5.0, 0, 3, 0, 1, 0, 7, 0]])
    keep = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    grad = torch.tensor([[0.0, 9, 0, 2, 0, 8, 0, 1]])
    new, k = drop_and_grow_keep(weight, keep, grad, 0.5)
    assert k == 2  # drops |w| = 1 and 3, grows the two largest gradients among the inactive: 9 and 8
    assert new.tolist() == [[True, True, False, False, False, True, True, False]]


def _erk_masks(model: nn.Module, sparsity: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {fqn: tuple(model.get_submodule(fqn).weight.shape) for fqn in ("0", "2")}
    masks = {}
    for fqn, s in erk(shapes, sparsity, max_sparsity=MAX_TRAINING_SPARSITY).items():
        n = torch.Size(shapes[fqn]).numel()
        order = torch.randperm(n, generator=g)
        keep = torch.ones(n, dtype=torch.bool)
        keep[order[: num_pruned(n, s)]] = False
        masks[fqn] = keep.reshape(shapes[fqn])
    return masks


@pytest.mark.parametrize("grow", ["random", "gradient"])
def test_density_constant_and_exact_regrowth(grow: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 6))
    state = MaskState(model, keep=_erk_masks(model, 0.8, g))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state.bind(opt)
    config = DropAndGrowConfig(grow=grow, drop_fraction=0.3, frequency=4, end_step=30)  # type: ignore[arg-type]
    dst = DropAndGrow(state, opt, config)
    active0 = {f: int(state.keep(f).sum()) for f in state.fqns}
    for step in range(32):
        x, y = torch.randn(16, 24, generator=g), torch.randint(0, 6, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = {f: state.keep(f).clone() for f in state.fqns}
        if dst.step(step):
            frac = drop_fraction_at(config, step)
            for f in state.fqns:
                keep, w = state.keep(f), state.weight(f)
                grown = keep & ~before[f]
                assert int(grown.sum()) == num_pruned(active0[f], frac) == dst.history[-1][f]  # scheduled count
                assert int((before[f] & ~keep).sum()) == int(grown.sum())  # as many dropped
                assert torch.count_nonzero(w.detach()[grown]) == 0  # regrown weights start at exactly 0
                for name in ("exp_avg", "exp_avg_sq"):
                    assert torch.count_nonzero(opt.state[w][name][grown | (before[f] & ~keep)]) == 0
        assert {f: int(state.keep(f).sum()) for f in state.fqns} == active0  # density exactly constant
        assert all(torch.count_nonzero(state.weight(f).detach()[~state.keep(f)]) == 0 for f in state.fqns)
    assert [t for t in range(32) if is_update_step(config, t)] == [4, 8, 12, 16, 20, 24, 28]
    assert len(dst.history) == 7 and sum(dst.history[0].values()) > sum(dst.history[-1].values()) > 0


def test_rigl_grows_where_dense_gradient_is_largest() -> None:
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    keep = {"0": torch.tensor([[True, True, False, False]])}
    state = MaskState(model, keep=keep)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dst = DropAndGrow(state, opt, DropAndGrowConfig(grow="gradient", drop_fraction=0.5, frequency=1, end_step=10))
    x = torch.tensor([[0.0, 0.0, 1.0, 5.0]])  # dL/dw = x: inactive w[3] has the largest gradient
    dst.step(0)  # step 0 is not an update; this arms gradient recording for step 1
    model(x).sum().backward()
    assert torch.equal(model[0].weight.grad, torch.tensor([[0.0, 0.0, 0.0, 0.0]]))  # masked for the optimizer
    assert dst.step(1)
    assert state.keep("0").tolist() == [[False, True, False, True]]  # dropped |w|=1, grew the |g|=5 slot
    assert model[0].weight.detach().tolist() == [[0.0, 2.0, 0.0, 0.0]]
