"""RIA score (golden 2x3 case), channel permutation for N:M, and its exact fold into an MLP."""

import torch
from torch.testing import assert_close

from conftest import tiny_model
from sparsecraft.engine.permute import mlp_consumers, permute_mlps_for_nm_
from sparsecraft.methods import get_method
from sparsecraft.methods.base import LayerStats
from sparsecraft.methods.ria import ria_score
from sparsecraft.patterns import NM, Unstructured, satisfies
from sparsecraft.solvers.permute import channel_permutation, greedy_assignment, nm_retained

W = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.0, -2.0]])
SQNORM = torch.tensor([1.0, 4.0, 9.0])  # ||X_j|| proportional to 1, 2, 3


def test_ria_score_golden_2x3():
    # row sums 6, 6; column sums 5, 2, 5; a = 1 multiplies by ||X_j|| = 1, 2, 3
    expected = torch.tensor([[(1 / 6 + 1 / 5) * 1, (2 / 6 + 2 / 2) * 2, (3 / 6 + 3 / 5) * 3],
                             [(4 / 6 + 4 / 5) * 1, 0.0, (2 / 6 + 2 / 5) * 3]])
    assert_close(ria_score(W, SQNORM, a=1.0), expected)
    # a = 0.5 (the default) uses ||X_j||^0.5 = sqnorm^0.25
    assert_close(ria_score(W, SQNORM), (expected / SQNORM.sqrt()) * SQNORM.pow(0.25))


def test_ria_method_prunes_lowest_per_row():
    V, keep = get_method("ria", a=1.0).prune(W, LayerStats(sqnorm=SQNORM), 1 / 3, Unstructured(), torch.Generator())
    assert torch.equal(keep, torch.tensor([[False, True, True], [True, False, True]]))
    assert torch.equal(V, W * keep)


def test_permutation_golden_and_never_worse():
    score = torch.tensor([[4.0, 3.0, 1.0, 0.0]])
    perm = channel_permutation(score, NM(1, 2))  # identity keeps 4 + 1; pairing 4 and 3 apart keeps 4 + 3
    assert nm_retained(score, NM(1, 2)) == 5.0 and nm_retained(score, NM(1, 2), perm) == 7.0
    g = torch.Generator().manual_seed(0)
    s = torch.rand(8, 32, generator=g) * torch.rand(32, generator=g) * 4
    p = channel_permutation(s, NM(2, 4))
    assert torch.equal(torch.sort(p).values, torch.arange(32))
    assert nm_retained(s, NM(2, 4), p) >= nm_retained(s, NM(2, 4))


def test_greedy_assignment_is_a_permutation_taking_the_best_pair_first():
    gain = torch.tensor([[1.0, 5.0], [4.0, 0.0]])
    assert torch.equal(greedy_assignment(gain), torch.tensor([1, 0]))


def test_fold_keeps_the_function_and_nm_is_exact_after(calib):
    model = tiny_model("llama")
    before = model(calib).logits
    consumers = mlp_consumers(model)
    assert set(consumers) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert all(len(p) == 2 for _, p in consumers.values())  # gate_proj and up_proj
    perms = permute_mlps_for_nm_(model, calib, NM(2, 4))
    assert_close(model(calib).logits, before, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(torch.sort(p).values, torch.arange(64)) for p in perms.values())
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    _, keep = get_method("ria").prune(w, LayerStats(sqnorm=torch.ones(64)), 0.5, NM(2, 4), torch.Generator())
    assert satisfies(keep, NM(2, 4))
