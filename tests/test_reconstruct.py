"""Block reconstruction: the block output error drops, pruned weights stay exactly zero, errors are checked."""

import pytest
import torch

from conftest import tiny_model
from sparsecraft.engine.blocks import find_targets
from sparsecraft.engine.capture import as_batches
from sparsecraft.engine.driver import capture
from sparsecraft.engine.reconstruct import block_error, reconstruct_block_
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
