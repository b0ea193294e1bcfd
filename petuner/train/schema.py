"""The ``trainer`` group's schema (``conf/trainer/*.yaml`` name it: ``- trainer_schema``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from petuner.errors import ConfigError
from petuner.schema import choice, flag, number
from petuner.train.device import PRECISIONS
from petuner.train.distributed import STRATEGIES
from petuner.train.guard import ACTIONS


def steps(default: int | None) -> Any:
    return number(default, low=1, strict=False, integer=True, optional=True)


def count(default: int) -> Any:
    return number(default, low=1, strict=False, integer=True)


@dataclass
class TrainerSchema:
    max_steps: int | None = steps(120)  # optimizer steps; null trains for `epochs` instead
    epochs: int | None = steps(None)
    batch_size: int = count(8)
    grad_accum: int = count(1)  # micro-batches per optimizer step
    max_grad_norm: float | None = number(1.0, optional=True)  # null disables clipping
    precision: str = choice("auto", ("auto", *PRECISIONS))
    gradient_checkpointing: bool = flag(False)
    labelled_logits: bool = flag(True)  # causal LM: the output layer runs only at labelled positions
    loss_chunk: int | None = steps(256)  # causal LM: output layer + loss over chunks of this many positions
    lean_swiglu: bool = flag(True)  # Llama-family MLPs save gate and up for backward, not silu(gate) too
    compile: bool = flag(False)  # torch.compile each decoder layer (the whole model if it has no layer stack)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (checked against the machine when the run starts)
    strategy: str = choice("ddp", STRATEGIES)  # under torchrun: ddp (replicate) | fsdp (shard, FSDP2)
    seed: int = number(42, strict=False, integer=True)
    eval_every: int | None = steps(None)  # steps between evaluations (always before and after training)
    eval_batch_size: int = count(16)
    save_every: int | None = steps(50)  # steps between checkpoints (and always at the end)
    keep_checkpoints: int = count(2)
    log_every: int = count(1)
    resume: bool = flag(False)  # continue run_dir's last checkpoint
    on_nonfinite: str = choice("stop", ACTIONS)  # a NaN/inf loss or gradient: stop | skip the step
    num_workers: int = number(0, strict=False, integer=True)
    # stop after this many evaluations without improving `objective` (needs eval_every); null: never
    early_stopping_patience: int | None = steps(None)
    early_stopping_min_delta: float = number(0.0, strict=False)  # an improvement must beat the best by more


def check_trainer_combination(cfg: Any) -> None:
    if cfg.max_steps is None and cfg.epochs is None:
        raise ConfigError("trainer.max_steps and trainer.epochs are both null: set one of them")
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise ConfigError(f"trainer.epochs={cfg.epochs} and trainer.max_steps={cfg.max_steps} are both set: "
                          "set trainer.max_steps=null to train for epochs, or trainer.epochs=null")
    if cfg.early_stopping_patience and not cfg.eval_every:
        raise ConfigError(f"trainer.early_stopping_patience={cfg.early_stopping_patience} needs evaluations: "
                          "set trainer.eval_every")
