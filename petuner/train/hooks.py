"""The loop's extension points: methods that need per-step behaviour provide a ``Hook``.

The loop knows no method by name. DyLoRA draws its rank in ``before_step``, SoRA's proximal gate
step runs in ``after_optimizer_step``, GaLore refreshes projectors in its optimizer; each keeps the
state it needs to resume in ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    metrics: dict[str, float] = field(default_factory=dict)  # the latest logged values


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

    def state_dict(self) -> dict[str, Any]:
        """What the hook needs to resume exactly (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
