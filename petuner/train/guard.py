"""The non-finite guard: a NaN or inf loss or gradient is caught in the step it appears.

``trainer.on_nonfinite=stop`` (default) ends the run at once with one line; nothing is saved after
the bad step, so the last checkpoint is the last good state. ``skip`` drops that step's update (the
batch is consumed, the schedule moves on) and counts it in ``train/skipped_steps``. Under fp16 the
gradient scaler's overflows are expected: such a step (finite loss, non-finite unscaled gradient) is
always skipped and counted, whatever ``on_nonfinite`` says, and the scaler lowers its scale. The guard
runs first among the hooks and sets ``state.skip_update``, so methods' own steps (SoRA's gates,
AdaLoRA's rank allocation) skip it too.
"""

from __future__ import annotations

from typing import Any

import torch

from petuner.errors import PetunerError
from petuner.train import distributed, fsdp
from petuner.train.checkpoint import latest_checkpoint
from petuner.train.hooks import Hook, TrainState

ACTIONS = ("stop", "skip")


class NonFiniteGuard(Hook):
    def __init__(self, action: str, scaled: bool = False) -> None:
        """``scaled``: gradients come from an fp16 gradient scaler, whose overflows are skipped steps."""
        self.action, self.scaled = action, scaled
        self.skipped = 0

    def after_backward(self, state: TrainState) -> None:
        flags = [~torch.isfinite(state.loss)]
        grads = [fsdp.local(p.grad) for p in state.model.parameters() if p.grad is not None]  # a shard each
        grads = [g for g in grads if g.numel()]
        if grads:
            flags.append(~torch.isfinite(torch.stack([g.float().abs().max() for g in grads])).all())
        # One read of the device per step, and one decision for every rank: a NaN on any rank acts on all.
        found = distributed.any_rank(torch.stack([f.to(state.loss.device) for f in flags])).tolist()
        bad = "loss" if found[0] else "gradient" if any(found[1:]) else None
        if bad is None:
            return
        if self.action == "stop" and not (self.scaled and bad == "gradient"):
            last = latest_checkpoint(state.run_dir) if state.run_dir else None
            raise PetunerError(f"non-finite {bad} at step {state.step + 1} (loss {state.loss.item()}); stopped "
                               f"(trainer.on_nonfinite=skip drops such steps); last good checkpoint: {last or 'none'}")
        self.skipped += 1
        state.skip_update = True
        for p in state.model.parameters():  # also what methods update themselves (SoRA's gates)
            p.grad = None

    def after_optimizer_step(self, state: TrainState) -> None:
        state.metrics["train/skipped_steps"] = self.skipped

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state["skipped"])
