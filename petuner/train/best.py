"""Keep the best evaluation's weights as ``RUN_DIR/best/``, and stop a run that no longer improves.

A hook, so the loop stays method- and policy-free: ``on_eval`` compares the run's ``objective`` with
the best so far, writes ``best/`` atomically (weights, ``best.json``, a checksum manifest) when it
improves by more than ``min_delta``, and requests a stop after ``patience`` evaluations without
improvement. Its counters travel in every checkpoint, so a killed and resumed run decides exactly
as the uninterrupted one would (the evaluations it redoes give the same values and rewrite the same
``best/``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from petuner.adapters import adapter_state_dict
from petuner.choices import DIRECTIONS
from petuner.io import ADAPTER_FILE, atomic_dir, atomic_write_json, save_tensors
from petuner.manifest import write_manifest
from petuner.train import distributed
from petuner.train.hooks import Hook, TrainState

BEST_DIR = "best"
BEST_FILE = "best.json"


class BestCheckpoint(Hook):
    """``best/`` by ``objective``; early stopping after ``patience`` evaluations without improvement."""

    def __init__(self, run_dir: Path, objective: str, patience: int | None, min_delta: float, enabled: bool = True):
        self.enabled = enabled  # always in the hook list, so a resume may switch trainer.eval_every on or off
        self.folder = Path(run_dir) / BEST_DIR
        self.objective, self.patience, self.min_delta = objective, patience, float(min_delta)
        self.sign = 1.0 if DIRECTIONS[objective] == "minimize" else -1.0
        self.best = math.inf  # sign * the best value so far
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped_at: int | None = None

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        value = self.sign * metrics[self.objective]
        if value < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = value, state.step, 0
            self._save(state, metrics)
        else:
            self.bad_evals += 1
        if self.patience and self.bad_evals >= self.patience and self.stopped_at is None:
            self.stopped_at = state.step
        state.stop = state.stop or self.stopped_at is not None

    def before_step(self, state: TrainState) -> None:
        state.stop = state.stop or self.stopped_at is not None  # a resumed run that had already stopped

    def _save(self, state: TrainState, metrics: dict[str, float]) -> None:
        weights = distributed.gathered(adapter_state_dict(state.model))  # every rank takes part (FSDP)
        if not distributed.is_writer():
            return
        with atomic_dir(self.folder, replace=True) as tmp:
            save_tensors(weights, tmp / ADAPTER_FILE)
            atomic_write_json(tmp / BEST_FILE, {"step": state.step, "objective": self.objective, **metrics})
            write_manifest(tmp, {"kind": "best"})

    def report(self) -> dict[str, float]:
        """What run.json's results say about it: the best step and value, and where training stopped."""
        out: dict[str, float] = {}
        if self.best_step is not None:
            out.update({"best/step": self.best_step, f"best/{self.objective}": self.sign * self.best})
        if self.stopped_at is not None:
            out["early_stopping/step"] = self.stopped_at
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = float(state["best"]), state["best_step"]
        self.bad_evals, self.stopped_at = int(state["bad_evals"]), state["stopped_at"]
