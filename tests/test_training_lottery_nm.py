"""Lottery tickets (exact rewinding, saved rounds) and N:M training (SR-STE / MDGF / SDGF golden gradients)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sparsecraft.patterns import NM, num_pruned, satisfies
from sparsecraft.training import (
    LotteryConfig,
    LotteryTicket,
    NMTrainer,
    NMTrainingConfig,
    load_round,
    mask_decay_alpha,
    round_sparsity,
    run_lottery,
    structure_decay_pattern,
)

torch.set_num_threads(1)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))


def _train(ticket: LotteryTicket, steps: int = 8) -> dict[str, float]:
    g = torch.Generator().manual_seed(ticket.round)
    opt = torch.optim.SGD(ticket.model.parameters(), lr=0.1, momentum=0.9)
    ticket.state.bind(opt)
    for step in range(steps):
        ticket.maybe_capture(step)
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(ticket.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"loss": loss.item()}


def test_imp_rewinds_exactly_and_saves_every_round(tmp_path: Path) -> None:
    model = _mlp()
    ticket = LotteryTicket(model, LotteryConfig(rounds=3, prune_fraction=0.5, rewind_step=2), tmp_path)
    _train(ticket)
    rewind = {k: v.clone() for k, v in ticket.rewind.items()}
    trained = model[0].weight.detach().clone()
    assert not torch.equal(trained, rewind["0.weight"])
    assert ticket.next_round_() == 0.5
    keep = ticket.state.keep("0")
    assert torch.equal(model[0].weight.detach(), rewind["0.weight"] * keep)  # kept weights rewound exactly
    assert torch.equal(model[0].bias.detach(), rewind["0.bias"])  # everything else rewound too
    # the mask was chosen by the TRAINED magnitudes, not the rewound ones
    assert trained.abs()[keep].min() >= trained.abs()[~keep].max()
    assert sum(ticket.state.zeros().values()) == num_pruned(12 * 24, 0.5) + num_pruned(24 * 3, 0.5)
    path = ticket.save_round()
    fresh = _mlp()
    state = load_round(fresh, path)
    assert torch.equal(state.keep("0"), keep) and torch.equal(fresh[0].weight, model[0].weight)


def test_run_lottery_rounds(tmp_path: Path) -> None:
    config = LotteryConfig(rounds=2, prune_fraction=0.2, allocation="global_magnitude")
    records = run_lottery(_mlp(), _train, config, tmp_path)
    assert [r["round"] for r in records] == [0.0, 1.0, 2.0]
    total = 12 * 24 + 24 * 3
    assert [round(r["sparsity"] * total) for r in records] == [0, num_pruned(total, 0.2), num_pruned(total, 0.36)]
    assert round_sparsity(config, 2) == pytest.approx(0.36)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"round_{r}.safetensors" for r in range(3)]


def _one_linear(values: list[float]) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([values]))
    return model


def test_srste_forward_and_backward_golden() -> None:
    model = _one_linear([4.0, -3.0, 2.0, 1.0])
    NMTrainer(model, NMTrainingConfig(NM(2, 4), "srste", srste_decay=0.5), ["0"])
    assert model[0].weight.tolist() == [[4.0, -3.0, 0.0, 0.0]]  # forward sees the 2:4-masked weight
    model(torch.ones(1, 4)).sum().backward()
    grad = model[0].parametrizations.weight.original.grad
    assert grad.tolist() == [[1.0, 1.0, 1.0 + 0.5 * 2.0, 1.0 + 0.5 * 1.0]]  # STE + lambda * pruned weight


def test_mdgf_gradient_flow_decays() -> None:
    config = NMTrainingConfig(NM(2, 4), "mdgf", decay="linear", initial_alpha=1.0, end_step=4)
    assert [mask_decay_alpha(config, t) for t in (0, 1, 2, 4, 9)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    model = _one_linear([4.0, -3.0, 2.0, 1.0])
    trainer = NMTrainer(model, config, ["0"])
    trainer.step(3)  # alpha = 0.25
    assert model[0].weight.tolist() == [[4.0, -3.0, 0.5, 0.25]]
    model(torch.ones(1, 4)).sum().backward()
    assert model[0].parametrizations.weight.original.grad.tolist() == [[1.0, 1.0, 0.25, 0.25]]
    exp = NMTrainingConfig(NM(2, 4), "mdgf", decay="exponential", decay_rate=5.0, end_step=10)
    assert mask_decay_alpha(exp, 5) == pytest.approx(torch.exp(torch.tensor(-2.5)).item())


def test_sdgf_stages_and_finalize() -> None:
    config = NMTrainingConfig(NM(1, 8), "sdgf", end_step=30)
    assert [structure_decay_pattern(config, t) for t in (0, 9, 10, 20, 29, 100)] == [
        NM(4, 8), NM(4, 8), NM(2, 8), NM(1, 8), NM(1, 8), NM(1, 8)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    trainer = NMTrainer(model, config, ["0", "2"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(35):
        trainer.step(step)
        loss = model(torch.randn(4, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = trainer.finalize()
    assert not any("parametrizations" in k for k in model.state_dict())
    for fqn in ("0", "2"):
        keep = state.keep(fqn)
        assert satisfies(keep, NM(1, 8)) and int(keep.sum()) == keep.numel() // 8  # exactly 1 per 8
        assert torch.count_nonzero(state.weight(fqn).detach()[~keep]) == 0


def test_nm_rejects_bad_width() -> None:
    model = nn.Sequential(nn.Linear(6, 2))
    with pytest.raises(ValueError, match="multiple of m=4"):
        NMTrainer(model, NMTrainingConfig(NM(2, 4)), ["0"])
