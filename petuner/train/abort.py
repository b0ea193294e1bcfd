"""Stop a run cleanly on SIGTERM: at the next step boundary, with a checkpoint of the last finished step.

``kill PID`` (what the web page's Abort sends, and what schedulers send before they kill) sets a flag; the
hook raises ``Interrupted`` at the start of the next optimizer step, before any other hook draws a random
number, so the state then is exactly the state after the last finished step. ``petuner.run`` catches it,
checkpoints that step with the ordinary checkpoint machinery and ends the run with one line; ``trainer.resume=true``
continues it to the same weights as an uninterrupted run. Under torchrun every rank agrees on the step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import torch

from petuner.train import distributed
from petuner.train.hooks import Hook, TrainState


class Interrupted(Exception):
    """Raised inside the loop on a stop request; ``step`` optimizer steps are complete."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM after step {step}")
        self.step = step


class StopOnSignal(Hook):
    """First in the hook list: raises ``Interrupted`` at a step boundary once SIGTERM arrived (on any rank)."""

    def __init__(self) -> None:
        self.requested = False

    def _request(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Catch SIGTERM while the block runs (main thread only: signal handlers live there), then restore."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._request)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def before_step(self, state: TrainState) -> None:
        # one decision for all ranks: a host tensor (the group has a gloo backend for CPU tensors); no-op alone
        if bool(distributed.any_rank(torch.tensor([self.requested])).item()):
            raise Interrupted(state.step)
