"""The loop's extension points: methods that need per-step behaviour provide a ``Hook``.

The loop knows no method by name. DyLoRA draws its rank in ``before_step``, SoRA's proximal gate
step runs in ``after_optimizer_step``, GaLore refreshes projectors in its optimizer; each keeps the
state it needs to resume in ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class TrainState:
    """What a hook may look at: the loop's position and the objects it trains."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    max_steps: int
    step: int = 0  # optimizer steps completed
    # This step's values to log; hooks may add their own (e.g. DyLoRA's drawn rank) in before_step.
    metrics: dict[str, float] = field(default_factory=dict)
    # This rank's part of the step's training loss (a device tensor: reading it waits for the device; the
    # step's loss is its sum over ranks), set before after_backward.
    loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    # A hook may veto this step's parameter update (the non-finite guard does, also for a step the fp16
    # gradient scaler skips); every hook that updates parameters itself must then skip too.
    skip_update: bool = False
    stop: bool = False  # a hook may end training early (early stopping does); the loop checkpoints and stops
    run_dir: Path | None = None  # where a hook may write its own artefacts (e.g. SoRA's sparsity curve)
    evaluate: Callable[[], dict[str, float]] | None = None  # held-out evaluation, for hooks that sweep it


class Hook:
    """No-op base: override only the moments a method needs."""

    def before_step(self, state: TrainState) -> None:
        """Before the forward passes of an optimizer step."""

    def after_backward(self, state: TrainState) -> None:
        """After gradients of all micro-batches are accumulated (unscaled), before clipping."""

    def after_optimizer_step(self, state: TrainState) -> None:
        """After ``optimizer.step()``; ``state.step`` already counts this step."""

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        """After an evaluation; may add entries to ``metrics``."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers the hook steps itself (SoRA's gates): the loop unscales their gradients with the
        main optimizer's, and a step the gradient scaler skips is skipped for them too."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What the hook needs to resume exactly (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
