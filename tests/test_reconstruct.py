"""Block reconstruction: the block output error drops, pruned weights stay exactly zero, errors are checked."""

import pytest
import torch

import sparsecraft
from conftest import tiny_model
from sparsecraft.engine.blocks import find_targets
from sparsecraft.engine.capture import as_batches
from sparsecraft.engine.driver import capture
from sparsecraft.engine.reconstruct import BlockReconstruction, block_error, reconstruct_block_
from sparsecraft.patterns import topk_mask


def pruned_block(calib):
    model = tiny_model("llama")
    blocks_fqn, blocks, calls = capture(model, as_batches(calib, 2), "cpu")
    block = blocks[0]
    with torch.no_grad():
        dense = [c.run(block, "cpu") for c in calls]
    targets = find_targets(block, f"{blocks_fqn}.0")
    masks = {}
    with torch.no_grad():
        for fqn, m in targets.items():
            masks[fqn] = topk_mask(m.weight.abs(), 0.5)
            m.weight.mul_(masks[fqn])
    return block, calls, targets, masks, dense


def test_error_drops_and_masks_hold(calib):
    block, calls, targets, masks, dense = pruned_block(calib)
    others = {n: p.detach().clone() for n, p in block.named_parameters() if not n.endswith("proj.weight")}
    out = reconstruct_block_(block, calls, targets, masks, dense, steps=40, lr=1e-2)
    assert out["after"] < 0.8 * out["before"] and out["steps"] == 40
    assert out["after"] == pytest.approx(block_error(block, calls, dense, "cpu"))
    for fqn, m in targets.items():
        assert (m.weight[~masks[fqn]] == 0).all() and m.weight.requires_grad  # flag restored
    assert all(torch.equal(p, others[n]) for n, p in block.named_parameters() if n in others)  # only targets train


def test_zero_steps_and_bad_inputs(calib):
    block, calls, targets, masks, dense = pruned_block(calib)
    out = reconstruct_block_(block, calls, targets, masks, dense, steps=0)
    assert out["before"] == out["after"] > 0
    with pytest.raises(ValueError, match="no keep-mask"):
        reconstruct_block_(block, calls, targets, {}, dense, steps=1)
    with pytest.raises(ValueError, match="one dense output per"):
        reconstruct_block_(block, calls, targets, masks, dense[:1], steps=1)


class Recorder(BlockReconstruction):
    """Records the reconstruction target the loop hands to each block."""

    def __init__(self, model, target):
        super().__init__(model, steps=0, target=target)
        self.targets: dict[int, torch.Tensor] = {}

    def __call__(self, index, block, calls, dense_outputs, masks):
        self.targets[index] = torch.cat(dense_outputs)
        super().__call__(index, block, calls, dense_outputs, masks)


def test_dense_target_is_the_dense_models_block_output(calib):
    dense = tiny_model("llama")
    with torch.no_grad():
        hidden = dense(calib, output_hidden_states=True).hidden_states  # (embeddings, block 0 out, block 1 out+norm)
    recorded = {}
    for target in ("dense", "local"):
        model = tiny_model("llama")
        hook = Recorder(model, target)
        sparsecraft.prune(model, "wanda", 0.7, "unstructured", calib, batch_size=2, progress=False, after_prune=hook)
        recorded[target] = hook.targets
    torch.testing.assert_close(recorded["dense"][0], hidden[1])  # block 0: both read the embeddings
    torch.testing.assert_close(recorded["local"][0], hidden[1])
    final_norm = tiny_model("llama").model.norm
    with torch.no_grad():  # block 1: the dense model's own output (its hidden_states add the final norm)
        torch.testing.assert_close(final_norm(recorded["dense"][1]), hidden[2])
        local = final_norm(recorded["local"][1])  # the dense block on the pruned block 0's output: another target
    assert (local - hidden[2]).abs().max() > 1e-3


def test_hook_rejects_bad_settings():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="valid targets: dense, local"):
        BlockReconstruction(model, 4, target="global")
    with pytest.raises(ValueError, match="lr > 0"):
        BlockReconstruction(model, 4, lr=0.0)
