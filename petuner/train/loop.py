"""The training loop: every adapter and optimizer goes through these lines, top to bottom.

Per optimizer step: hooks.before_step → forward/backward over ``grad_accum`` micro-batches (fewer in an
epoch's last step when ``grad_accum`` does not divide its batches: no step spans two epochs) →
unscale (every optimizer's, hooks' too) → hooks.after_backward (the guard first: a non-finite or
scaler-overflowing step is skipped for every hook) → clip → optimizer, scheduler → hooks.after_optimizer_step → log,
evaluate, checkpoint. Data order is a pure function of (seed, epoch), so a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from petuner.data import DataBundle
from petuner.train import distributed, fsdp
from petuner.train.checkpoint import save_checkpoint
from petuner.train.device import autocast, peak_memory
from petuner.train.hooks import Hook, TrainState
from petuner.train.logging import MetricsLog
from petuner.train.objective import Objective, labelled_items

__all__ = ["Loop", "batches_per_epoch", "evaluate", "labelled_items", "total_steps"]

log = logging.getLogger(__name__)


def epoch_batches(order: list[int], size: int) -> list[list[int]]:
    """An epoch's global batches of ``size`` examples (``trainer.batch_size`` is global: all ranks together)."""
    return distributed.whole_batches([order[i:i + size] for i in range(0, len(order), size)])


def batches_per_epoch(train_examples: int, batch_size: int) -> int:
    """Global batches in an epoch (an epoch's last batch too small to give every rank an example is dropped)."""
    return len(epoch_batches(list(range(train_examples)), batch_size))


def steps_per_epoch(train_examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch: ``grad_accum`` batches each, the last one shorter when ``grad_accum``
    does not divide the epoch's batches (as transformers' Trainer does), so no step spans two epochs."""
    return math.ceil(batches_per_epoch(train_examples, batch_size) / grad_accum)


def total_steps(cfg: Any, train_examples: int) -> int:
    """Optimizer steps in the run: ``max_steps``, or ``epochs`` worth of steps."""
    if cfg.max_steps:
        return int(cfg.max_steps)
    return int(cfg.epochs) * steps_per_epoch(train_examples, cfg.batch_size, cfg.grad_accum)


def _private_generator() -> torch.Generator:
    """DataLoader draws a worker seed from its generator; a private one keeps the global RNG
    (dropout's) untouched, so resuming mid-epoch consumes exactly the same random numbers."""
    return torch.Generator().manual_seed(0)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def _eval_sums(model: nn.Module, data: DataBundle, dataset: Any, batch_size: int, device: torch.device,
               compute_dtype: torch.dtype | None, objective: Objective) -> dict[str, float]:
    """The objective's sums over one held-out set (loss · items, items, ...). Under torchrun each rank
    evaluates its shard and the sums are added over ranks."""
    keys = objective.eval_keys(data.kind)
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
    share, summed = distributed.eval_share(model, len(dataset))
    loader = DataLoader(share, batch_size=batch_size, collate_fn=lambda idx: data.collate([dataset[i] for i in idx]),
                        generator=_private_generator())
    for host_batch in loader:
        batch = to_device(host_batch, device)
        with autocast(device, compute_dtype):
            figures = objective.eval_sums(model, batch, data.kind)
        sums += torch.stack([figures[k].to(device, torch.float64) for k in keys])
    return dict(zip(keys, (distributed.sum_over_ranks(sums) if summed else sums).tolist(), strict=True))


def evaluate(model: nn.Module, data: DataBundle, batch_size: int, device: torch.device,
             compute_dtype: torch.dtype | None, objective: Objective | None = None) -> dict[str, float]:
    """Held-out loss, token-weighted for language modelling (plus perplexity or accuracy; a preference
    objective's rewards); with several data sources, also per source (eval/<source>/loss), the combined
    figure over all their examples."""
    objective = objective or Objective()
    was_training = model.training
    model.eval()
    sets = data.evals if len(data.evals) > 1 else {"": data.eval}
    sums = {name: _eval_sums(model, data, dataset, batch_size, device, compute_dtype, objective)
            for name, dataset in sets.items()}
    model.train(was_training)
    total = {key: sum(figures[key] for figures in sums.values()) for key in objective.eval_keys(data.kind)}
    metrics = objective.eval_metrics(data.kind, "eval", total)
    if len(sums) > 1:
        for name, figures in sums.items():
            metrics.update(objective.eval_metrics(data.kind, f"eval/{name}", figures))
    return metrics


@dataclass
class Loop:
    """Everything a run trains with; built by ``petuner.run``."""

    model: nn.Module
    data: DataBundle
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    hooks: list[Hook]
    cfg: Any  # the trainer config group
    device: torch.device
    compute_dtype: torch.dtype | None
    run_dir: Path
    metrics: MetricsLog
    trained: nn.Module | None = None  # what forward/backward go through (DDP's wrapper); ``model`` if None
    objective: Objective = field(default_factory=Objective)  # what a batch's loss is (the model's own by default)
    last_eval: tuple[int, dict[str, float]] = (-1, {})
    step_metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # the objective's, this step's

    def total_steps(self) -> int:
        return total_steps(self.cfg, len(self.data.train))

    # --- data -----------------------------------------------------------------------------------

    def step_batches(self, start_step: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        """This rank's shares of each optimizer step's micro-batches, from step ``start_step`` on. Every
        epoch is ``steps_per_epoch`` steps of ``grad_accum`` batches (its last step takes what is left), so
        an epoch sees each example once; every rank draws the same order (seed + epoch) and takes its part
        of each global batch."""
        n, size, accum = len(self.data.train), self.cfg.batch_size, self.cfg.grad_accum
        epoch, step = divmod(start_step, steps_per_epoch(n, size, accum))
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch)).tolist()
            batches = [distributed.shard(b) for b in epoch_batches(order, size)[step * accum:]]
            loader = iter(DataLoader(self.data.train, batch_sampler=batches, collate_fn=self.data.collate,
                                     num_workers=self.cfg.num_workers, generator=_private_generator()))
            for first in range(0, len(batches), accum):
                yield [next(loader) for _ in batches[first:first + accum]]
            epoch, step = epoch + 1, 0

    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.data, self.cfg.eval_batch_size, self.device, self.compute_dtype,
                        self.objective)

    def run_eval(self, state: TrainState) -> dict[str, float]:
        if self.last_eval[0] == state.step:  # an early stop's evaluation is also the final one
            return self.last_eval[1]
        metrics = self.evaluate()
        for hook in self.hooks:
            hook.on_eval(state, metrics)
        self.metrics.log(metrics, state.step)
        log.info("step %d: %s", state.step, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        self.last_eval = (state.step, metrics)
        return metrics

    # --- training -------------------------------------------------------------------------------

    def accumulate(self, micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, int]:
        """Forward and backward over one step's micro-batches (host-side; this rank's shares).

        The step's loss is the mean over all of its labelled items, on every rank, however the global
        batch is split: each micro-batch's mean loss weighs by its items over the step's total. The
        total is counted on the host and summed over ranks on the device (no host sync). Scaling the
        model's mean rather than passing ``num_items_in_batch`` works for every model, and weighs a
        regulariser added to the loss in a forward hook (AdaLoRA's) once per step. DDP averages
        gradients over ranks, hence × world. Returns this rank's part of the loss and its token count;
        the objective's metrics (summed over items, this rank's part of the step's mean) go to ``step_metrics``.
        """
        trained, world = self.trained or self.model, distributed.world_size()
        items = [self.objective.items(b, self.data.kind) for b in micro]
        total = distributed.sum_over_ranks(torch.tensor(float(sum(items)), device=self.device))
        loss_sum, tokens = torch.zeros((), device=self.device), 0
        self.step_metrics = {}
        for i, host_batch in enumerate(micro):
            tokens += int(host_batch["attention_mask"].sum())
            batch = to_device(host_batch, self.device)
            with distributed.no_sync(trained, last=i == len(micro) - 1):
                with autocast(self.device, self.compute_dtype):
                    loss, sums = self.objective.loss(trained, batch)
                    loss = loss * (items[i] / total)
                self.scaler.scale(loss * world).backward()
            loss_sum += loss.detach()
            for key, value in sums.items():
                self.step_metrics[key] = self.step_metrics.get(key, 0.0) + value.float() / total
        return loss_sum, tokens

    def log_step(self, state: TrainState, tokens: int, seconds: float, lr: float,
                 grad_norm: torch.Tensor) -> tuple[float, float]:
        """Log the step's figures, summed over ranks (the objective's metrics too); returns loss and tokens."""
        names = sorted(self.step_metrics)
        loss, tokens_all, *figures = distributed.sum_over_ranks(torch.stack(
            [state.loss.float(), torch.tensor(float(tokens), device=self.device),
             *(self.step_metrics[k] for k in names)])).tolist()
        state.metrics.update({f"train/{k}": v for k, v in zip(names, figures, strict=True)})
        state.metrics.update({"train/loss": loss, "train/lr": lr, "train/grad_norm": fsdp.local(grad_norm).item(),
                              "train/tokens_per_s": tokens_all / seconds, "train/step_s": seconds})
        self.metrics.log(state.metrics, state.step)
        return loss, tokens_all

    def train(self, start_step: int = 0) -> dict[str, float]:
        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        max_steps = self.total_steps()
        state = TrainState(model=model, optimizer=optimizer, max_steps=max_steps, step=start_step,
                           run_dir=self.run_dir, evaluate=self.evaluate)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizers = [optimizer, *(o for hook in self.hooks for o in hook.optimizers())]
        results: dict[str, float] = {}
        before = self.run_eval(state) if start_step == 0 else self.metrics.logged_at(0)  # a resume's, as logged
        results.update({f"{k}_before": v for k, v in before.items()})
        batches = self.step_batches(start_step)
        (self.trained or model).train()
        with logging_redirect_tqdm(), tqdm(total=max_steps, initial=start_step, desc="train",
                                           dynamic_ncols=True, disable=not distributed.is_writer()) as bar:
            while state.step < max_steps:
                t0 = time.perf_counter()
                state.metrics, state.skip_update = {}, False
                for hook in self.hooks:
                    hook.before_step(state)
                if state.stop:
                    break
                state.loss, tokens = self.accumulate(next(batches))
                for opt in optimizers:  # every gradient a step uses, the hooks' own included, unscaled
                    self.scaler.unscale_(opt)
                for hook in self.hooks:
                    hook.after_backward(state)
                grad_norm = (torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                             if cfg.max_grad_norm else torch.tensor(math.nan))
                lr = optimizer.param_groups[0]["lr"]
                if not state.skip_update:
                    self.scaler.step(optimizer)
                self.scaler.update()
                self.scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                for hook in self.hooks:
                    hook.after_optimizer_step(state)

                seconds = time.perf_counter() - t0
                if state.step % cfg.log_every == 0 or state.step == max_steps:  # the step's only reads of the device
                    loss, tokens = self.log_step(state, tokens, seconds, lr, grad_norm)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
                bar.update(1)
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < max_steps:
                    self.run_eval(state)
                if state.step == max_steps or state.stop or (cfg.save_every and state.step % cfg.save_every == 0):
                    save_checkpoint(self.run_dir, state.step, model, optimizer, self.scheduler, self.scaler,
                                    self.hooks, keep=cfg.keep_checkpoints)
                if state.stop:
                    log.info("early stopping at step %d", state.step)
                    break
        results.update({f"{k}_after": v for k, v in self.run_eval(state).items()})
        results.update(peak_memory(self.device))
        return results
