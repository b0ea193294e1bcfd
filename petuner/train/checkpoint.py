"""Checkpoints: adapter weights (safetensors) + optimizer, scheduler, scaler, hooks and RNG states.

Each checkpoint is a folder ``checkpoints/step-NNNNNNNN`` written atomically (temporary folder,
fsync, rename), so a kill at any moment leaves the previous checkpoint loadable. The state file is
read back with ``torch.load(weights_only=True)``: no pickled code runs on resume.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from petuner.adapters import adapter_state_dict, load_adapter_state_dict
from petuner.errors import PetunerError
from petuner.io import ADAPTER_FILE, CHECKPOINTS, STATE_FILE, atomic_dir, save_tensors
from petuner.train import distributed, fsdp
from petuner.train.hooks import Hook

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the saved generators; on fewer (or more) GPUs than saved, those present get theirs."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved, count = state["cuda"], torch.cuda.device_count()
        if len(saved) != count:
            log.warning("resuming on %d CUDA devices, saved with %d: random streams (dropout) of devices beyond "
                        "the first %d differ from the uninterrupted run", count, len(saved), min(count, len(saved)))
        for index, rng in enumerate(saved[:count]):
            torch.cuda.set_rng_state(rng, index)


def checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, hooks: list[Hook], keep: int) -> Path:
    """Every rank's RNG state is gathered (each rank's dropout differs); rank 0 writes, the rest wait."""
    dest = Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"
    rngs = distributed.gather_objects(rng_state())
    weights = distributed.gathered(adapter_state_dict(model))
    optimizer_state = fsdp.optimizer_state(model, optimizer) if fsdp.is_sharded(model) else optimizer.state_dict()
    if distributed.is_writer():
        with atomic_dir(dest, replace=True) as tmp:
            save_tensors(weights, tmp / ADAPTER_FILE)
            torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "hooks": hook_states(hooks),
                        "rng": rngs[0], "rng_per_rank": rngs[1:], "world_size": len(rngs)}, tmp / STATE_FILE)
        for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return dest


def hook_names(hooks: list[Hook]) -> list[str]:
    """Each hook's name in a checkpoint: its class's, numbered where a class comes twice."""
    names = [type(h).__name__ for h in hooks]
    return [f"{n}#{names[:i].count(n)}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def hook_states(hooks: list[Hook]) -> dict[str, Any]:
    return dict(zip(hook_names(hooks), (h.state_dict() for h in hooks), strict=True))


def load_hook_states(hooks: list[Hook], saved: dict[str, Any] | list[Any], path: Path) -> None:
    """Each hook's saved state, by name. A hook that keeps no state may be missing from an older checkpoint (one
    written before the hook existed); a hook that keeps some may not. Checkpoints listing the states by position
    (before they were named) load where they hold one per hook, or one per hook that keeps state."""
    names = hook_names(hooks)
    keeping = [n for n, h in zip(names, hooks, strict=True) if h.state_dict()]
    if isinstance(saved, list):
        listed = names if len(saved) == len(names) else keeping if len(saved) == len(keeping) else None
        if listed is None:
            raise PetunerError(f"trainer.resume=true: {path} holds the states of {len(saved)} per-step hooks, this "
                               f"run has {len(names)} ({', '.join(names)}): resume it with the petuner that wrote it")
        saved = dict(zip(listed, saved, strict=True))
    missing, unknown = [n for n in keeping if n not in saved], sorted(set(saved) - set(names))
    if missing or unknown:
        what = f"no state for {missing[0]}" if missing else f"the state of {unknown[0]}, which this run does not have"
        raise PetunerError(f"trainer.resume=true: {path} holds {what} (written by another petuner version or "
                           "adapter): resume it with the one that wrote it")
    for name, hook in zip(names, hooks, strict=True):
        if name in saved:
            hook.load_state_dict(saved[name])


def check_world_size(path: Path) -> None:
    """A checkpoint resumes only with the number of processes that wrote it: each rank's RNG (dropout)
    stream is part of the state, and another world size would make the run a different one."""
    saved = int(torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True).get("world_size", 1))
    if saved != distributed.world_size():
        raise PetunerError(f"trainer.resume=true: {path} was written by {saved} process(es) but this run has "
                           f"{distributed.world_size()}; resume with the same number of processes")


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler, hooks: list[Hook]) -> int:
    """Restore everything ``save_checkpoint`` wrote; returns the step to continue from."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if fsdp.is_sharded(model):
        fsdp.load(model, optimizer, load_file(str(path / ADAPTER_FILE)), state["optimizer"])
    else:
        load_adapter_state_dict(model, load_file(str(path / ADAPTER_FILE)))
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    load_hook_states(hooks, state["hooks"], path)
    set_rng_state(state["rng"] if distributed.rank() == 0 else state["rng_per_rank"][distributed.rank() - 1])
    return int(state["step"])
