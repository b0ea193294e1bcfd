"""What a resumed run may change, and continuing on the schedule of a changed length.

A resume continues the interrupted run: each remaining step must be the step that run would have taken.
So every setting that decides what a step computes must stay as it was: the model, data, adapter and
optimizer groups, the objective, and the trainer keys that fix the data order and the update
(``batch_size``, ``grad_accum``, ``seed``, ``max_grad_norm``, ``precision``). What may change is
``MAY_CHANGE``: when training stops (a longer or shorter run, early stopping), when it evaluates, logs and
saves, and how a step is computed where the result is the same. docs/reliability.md explains each one.

A changed length rebuilds the learning-rate schedule for the new total; the checkpoint's optimizer state
carries the old schedule's next learning rate, so ``follow_schedule`` resets it from the rebuilt one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from petuner.errors import PetunerError
from petuner.io import CONFIG_FILE

log = logging.getLogger(__name__)

SECTIONS = ("model", "data", "adapter", "optimizer", "trainer", "objective")
MAY_CHANGE = (
    # when training stops
    "trainer.max_steps", "trainer.epochs", "trainer.early_stopping_patience", "trainer.early_stopping_min_delta",
    "trainer.on_nonfinite",
    # when it evaluates, logs and saves (evaluation is token-weighted: its batch size changes only rounding)
    "trainer.eval_every", "trainer.eval_batch_size", "trainer.log_every", "trainer.save_every",
    "trainer.keep_checkpoints", "trainer.resume",
    # how a step is computed, where the loss and gradients stay the same
    "trainer.device", "trainer.num_workers", "trainer.strategy", "trainer.gradient_checkpointing",
    "trainer.compile", "trainer.labelled_logits", "trainer.loss_chunk", "trainer.lean_swiglu",
)
SCHEDULES_OF_ANY_LENGTH = ("constant",)  # a warmup then a constant rate: the same steps at any max_steps
_UNSET = "<unset>"


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    if not isinstance(plain, dict):
        return {prefix: plain}
    out: dict[str, Any] = {}
    for key, item in plain.items():
        out.update(_flat(item, f"{prefix}.{key}"))
    return out


def changed_settings(saved: Any, cfg: Any) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every setting a resume may not change."""
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    for section in SECTIONS:
        old.update(_flat(saved.get(section, _UNSET), section))
        new.update(_flat(cfg.get(section, _UNSET), section))
    keys = sorted(set(old) | set(new), key=lambda k: (SECTIONS.index(k.split(".")[0]), k))
    return [(k, old.get(k, _UNSET), new.get(k, _UNSET)) for k in keys
            if k not in MAY_CHANGE and old.get(k, _UNSET) != new.get(k, _UNSET)]


def check_unchanged(saved: Any, cfg: Any, run_dir: Path) -> None:
    """One line naming the first setting (and how many more) that would make the resume another run."""
    changed = changed_settings(saved, cfg)
    if not changed:
        return
    key, old, new = changed[0]
    more = f" (and {len(changed) - 1} more: {', '.join(k for k, _, _ in changed[1:])})" if len(changed) > 1 else ""
    raise PetunerError(f"trainer.resume=true but {key}={new!r} differs from the {old!r} that {run_dir}/"
                       f"{CONFIG_FILE} trained with{more}; a resume continues the same steps, so only these trainer "
                       f"keys may change: {', '.join(k.removeprefix('trainer.') for k in MAY_CHANGE)}; to train "
                       f"with {key}={new!r}, start a new run_dir")


def check_length(step: int, total: int, saved_total: int, schedule: str) -> None:
    """Refuse a run shorter than its checkpoint; say what a longer or shorter schedule does to the rate."""
    if step > total:
        raise PetunerError(f"trainer.resume=true: the checkpoint is at step {step}, beyond this run's {total} "
                           "steps; set trainer.max_steps (or trainer.epochs) to at least that")
    if total != saved_total and schedule not in SCHEDULES_OF_ANY_LENGTH:
        log.warning("the run now has %d steps instead of %d: steps %d-%d follow the %d-step %s schedule, so the "
                    "weights differ from those of an uninterrupted %d-step run (optimizer.schedule=constant "
                    "resumes to the same weights at any length)", total, saved_total, step + 1, total, total,
                    schedule, total)


def follow_schedule(scheduler: Any) -> None:
    """Set the optimizer's learning rates from the rebuilt schedule at the restored step. Every schedule is a
    ``LambdaLR`` (transformers' ``get_scheduler``), whose rate is closed-form in the step: one step back and
    forth recomputes it. Bit-identical to the saved rate when the length did not change."""
    scheduler.last_epoch -= 1
    scheduler.step()
