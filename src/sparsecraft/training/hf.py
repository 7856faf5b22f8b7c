"""Hugging Face Trainer integration: keep masks fixed during ``Trainer.train()``.

    state = MaskState(model, keep=masks)
    trainer = Trainer(model=model, ..., callbacks=[MaskCallback(state)])

Gradients of pruned weights are already masked by the MaskState's hooks; the callback re-zeroes the pruned
weights right after every optimizer step (before the next forward), whatever optimizer the Trainer built.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from sparsecraft.training.masks import MaskState


class MaskCallback(TrainerCallback):
    def __init__(self, state: MaskState) -> None:
        self.mask_state = state

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.mask_state.apply_()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.mask_state.apply_()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.mask_state.apply_()
