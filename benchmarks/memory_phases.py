"""Peak memory per phase of a run (loading, data, evaluation, training...), so a gap cannot hide in a total.

On Linux, ``/proc/self/status`` VmHWM is the process's resident high-water mark and writing 5 to
``/proc/self/clear_refs`` resets it to the current RSS; each phase's peak is the high-water mark between
its start and its end (phases may nest: the outer phase's peak excludes the inner one's). On CUDA the same
with ``torch.cuda.max_memory_allocated`` and ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def _cuda() -> bool:
    return torch.cuda.is_available()


def high_water() -> float:
    if _cuda():
        return float(torch.cuda.max_memory_allocated())
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_high_water() -> None:
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PhasePeaks:
    """Wrap functions as named phases; ``peaks`` maps each phase to the highest memory seen inside it."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.stack: list[str] = ["other"]
        reset_high_water()

    def _close_segment(self) -> None:
        phase = self.stack[-1]
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), high_water())
        reset_high_water()

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._close_segment()
            self.stack.append(phase)
            try:
                return original(*args, **kwargs)
            finally:
                self._close_segment()
                self.stack.pop()

        setattr(owner, name, wrapped)

    def finish(self) -> dict[str, float]:
        self._close_segment()
        return dict(self.peaks)
