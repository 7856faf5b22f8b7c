"""SquareHead loss, masked fine-tuning of a tiny Llama (sparsity exactly unchanged), sparse soups, HF callback."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from sparsecraft.patterns import topk_mask
from sparsecraft.training import FinetuneConfig, MaskState, maskable_modules, masked_finetune, sparse_soup, squarehead_loss

torch.set_num_threads(1)


def test_squarehead_golden() -> None:
    t = [torch.tensor([[[1.0, 1.0], [1.0, 1.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])]
    s = [torch.tensor([[[0.0, 1.0], [1.0, 1.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])]
    # layer 1: mse 1/4 over energy 1 = 0.25; layer 2: 0; mean = 0.125
    assert squarehead_loss(s, t).item() == pytest.approx(0.125)
    mask = torch.tensor([[False, True]])  # drop the token that differs -> 0
    assert squarehead_loss(s, t, attention_mask=mask).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        squarehead_loss(s, t[:1])


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _wanda_free_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    fqns = maskable_modules(model, types=(nn.Linear,), exclude=("lm_head",))
    return {f: topk_mask(model.get_submodule(f).weight.abs(), 0.5) for f in fqns}


def test_masked_finetune_with_distillation_keeps_sparsity_exactly() -> None:
    teacher = _tiny_llama()
    student = _tiny_llama()
    masks = _wanda_free_masks(student)
    state = MaskState(student, keep=masks)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(2)]
    config = FinetuneConfig(steps=12, lr=3e-3, weight_decay=0.1, warmup_steps=2, task_weight=0.0, distill_weight=1.0)
    records = masked_finetune(student, state, batches, config, teacher=teacher)
    assert len(records) == 12 and records[-1]["squarehead"] < records[0]["squarehead"]
    for fqn, keep in masks.items():
        w = state.weight(fqn).detach()
        assert torch.count_nonzero(w[~keep]) == 0 and torch.count_nonzero(w[keep]) == int(keep.sum())
    assert state.zeros() == {f: int((~k).sum()) for f, k in masks.items()}


def test_sparse_soup_keeps_the_mask() -> None:
    base = _tiny_llama()
    masks = _wanda_free_masks(base)
    ingredients = []
    for seed in (1, 2):
        model = _tiny_llama()
        state = MaskState(model, keep=masks)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        state.bind(opt)
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        ingredients.append({k: v.clone() for k, v in model.state_dict().items()})
    soup = sparse_soup(ingredients)
    fqn = "model.layers.0.mlp.up_proj"
    expected = (ingredients[0][f"{fqn}.weight"].double() / 2 + ingredients[1][f"{fqn}.weight"].double() / 2).float()
    assert torch.equal(soup[f"{fqn}.weight"], expected)
    assert torch.equal(soup[f"{fqn}.weight_keep"], masks[fqn])
    assert torch.count_nonzero(soup[f"{fqn}.weight"][~masks[fqn]]) == 0
    fresh = _tiny_llama()
    state = MaskState.from_state_dict(fresh, soup)
    fresh.load_state_dict(soup)
    assert state.zeros() == {f: int((~k).sum()) for f, k in masks.items()}
    other = dict(ingredients[1])
    other[f"{fqn}.weight_keep"] = ~masks[fqn]
    with pytest.raises(ValueError, match="fine-tuned from ONE sparse"):
        sparse_soup([ingredients[0], other])


def test_hf_trainer_callback(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    from sparsecraft.training.hf import MaskCallback

    model = _tiny_llama()
    masks = _wanda_free_masks(model)
    state = MaskState(model, keep=masks)
    start = {fqn: state.weight(fqn).detach().clone() for fqn in masks}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 16), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[MaskCallback(state)]).train()
    for fqn, keep in masks.items():
        w = state.weight(fqn).detach()
        assert torch.count_nonzero(w[~keep]) == 0 and not torch.equal(w[keep], start[fqn][keep])
