"""The training loop: every adapter and optimizer goes through these lines, top to bottom.

Per optimizer step: hooks.before_step → forward/backward over ``grad_accum`` micro-batches →
unscale → hooks.after_backward → clip → optimizer, scheduler → hooks.after_optimizer_step → log,
evaluate, checkpoint. Data order is a pure function of (seed, epoch), so a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from petuner.data import DataBundle
from petuner.data.sft import IGNORE
from petuner.train.checkpoint import save_checkpoint
from petuner.train.device import autocast, peak_memory
from petuner.train.hooks import Hook, TrainState
from petuner.train.logging import MetricsLog

log = logging.getLogger(__name__)


def total_steps(cfg: Any, train_examples: int) -> int:
    """Optimizer steps in the run: ``max_steps``, or ``epochs`` worth of accumulated batches."""
    if cfg.max_steps:
        return int(cfg.max_steps)
    return int(cfg.epochs) * math.ceil(math.ceil(train_examples / cfg.batch_size) / cfg.grad_accum)


def _private_generator() -> torch.Generator:
    """DataLoader draws a worker seed from its generator; a private one keeps the global RNG
    (dropout's) untouched, so resuming mid-epoch consumes exactly the same random numbers."""
    return torch.Generator().manual_seed(0)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def _eval_sums(model: nn.Module, data: DataBundle, dataset: Any, batch_size: int, device: torch.device,
               compute_dtype: torch.dtype | None) -> tuple[float, float, float]:
    """(loss sum, weight, correct) over one held-out set: weight is labelled tokens, or examples."""
    loss_sum = weight = correct = 0.0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=data.collate, generator=_private_generator())
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, compute_dtype):
            out = model(**batch)
        labels = batch["labels"]
        if data.kind == "classification":
            n = labels.numel()
            correct += (out.logits.argmax(-1) == labels).sum().item()
        else:
            n = (labels[:, 1:] != IGNORE).sum().item()
        loss_sum += out.loss.float().item() * n
        weight += n
    return loss_sum, weight, correct


def _eval_metrics(kind: str, prefix: str, loss_sum: float, weight: float, correct: float) -> dict[str, float]:
    metrics = {f"{prefix}/loss": loss_sum / weight}
    if kind == "classification":
        metrics[f"{prefix}/accuracy"] = correct / weight
    else:
        metrics[f"{prefix}/perplexity"] = math.exp(min(metrics[f"{prefix}/loss"], 50.0))
    return metrics


def evaluate(model: nn.Module, data: DataBundle, batch_size: int, device: torch.device,
             compute_dtype: torch.dtype | None) -> dict[str, float]:
    """Held-out loss, token-weighted for language modelling (plus perplexity or accuracy); with several
    data sources, also per source (eval/<source>/loss), the combined figure over all their examples."""
    was_training = model.training
    model.eval()
    sets = data.evals if len(data.evals) > 1 else {"": data.eval}
    sums = {name: _eval_sums(model, data, dataset, batch_size, device, compute_dtype) for name, dataset in sets.items()}
    model.train(was_training)
    metrics = _eval_metrics(data.kind, "eval", *(sum(column) for column in zip(*sums.values(), strict=True)))
    if len(sums) > 1:
        for name, figures in sums.items():
            metrics.update(_eval_metrics(data.kind, f"eval/{name}", *figures))
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

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / self.cfg.batch_size)

    def total_steps(self) -> int:
        return total_steps(self.cfg, len(self.data.train))

    # --- data -----------------------------------------------------------------------------------

    def micro_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from global index ``start`` on; each epoch reshuffled with seed + epoch."""
        n, size = len(self.data.train), self.cfg.batch_size
        epoch, offset = divmod(start, self.batches_per_epoch)
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch)).tolist()
            batches = [order[i:i + size] for i in range(0, n, size)][offset:]
            yield from DataLoader(self.data.train, batch_sampler=batches, collate_fn=self.data.collate,
                                  num_workers=self.cfg.num_workers, generator=_private_generator())
            epoch, offset = epoch + 1, 0


    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.data, self.cfg.eval_batch_size, self.device, self.compute_dtype)

    def run_eval(self, state: TrainState) -> dict[str, float]:
        metrics = self.evaluate()
        for hook in self.hooks:
            hook.on_eval(state, metrics)
        self.metrics.log(metrics, state.step)
        log.info("step %d: %s", state.step, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    # --- training -------------------------------------------------------------------------------

    def train(self, start_step: int = 0) -> dict[str, float]:
        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        max_steps = self.total_steps()
        state = TrainState(model=model, optimizer=optimizer, max_steps=max_steps, step=start_step,
                           run_dir=self.run_dir, evaluate=self.evaluate)
        trainable = [p for p in model.parameters() if p.requires_grad]
        results: dict[str, float] = {}
        if start_step == 0:
            results.update({f"{k}_before": v for k, v in self.run_eval(state).items()})
        batches = self.micro_batches(start_step * cfg.grad_accum)
        model.train()
        with logging_redirect_tqdm(), tqdm(total=max_steps, initial=start_step, desc="train",
                                           dynamic_ncols=True) as bar:
            while state.step < max_steps:
                t0 = time.perf_counter()
                state.metrics, state.skip_update = {}, False
                for hook in self.hooks:
                    hook.before_step(state)
                loss_sum, tokens = 0.0, 0
                for _ in range(cfg.grad_accum):
                    batch = to_device(next(batches), self.device)
                    with autocast(self.device, self.compute_dtype):
                        loss = model(**batch).loss / cfg.grad_accum
                    self.scaler.scale(loss).backward()
                    loss_sum += loss.item()
                    tokens += int(batch["attention_mask"].sum())
                self.scaler.unscale_(optimizer)
                state.loss = loss_sum
                for hook in self.hooks:
                    hook.after_backward(state)
                grad_norm = (torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm).item()
                             if cfg.max_grad_norm else float("nan"))
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
                state.metrics.update({"train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm,
                                      "train/tokens_per_s": tokens / seconds, "train/step_s": seconds})
                if state.step % cfg.log_every == 0 or state.step == max_steps:
                    self.metrics.log(state.metrics, state.step)
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
                bar.update(1)
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < max_steps:
                    self.run_eval(state)
                if state.step == max_steps or (cfg.save_every and state.step % cfg.save_every == 0):
                    save_checkpoint(self.run_dir, state.step, model, optimizer, self.scheduler, self.scaler,
                                    self.hooks, keep=cfg.keep_checkpoints)
        results.update({f"{k}_after": v for k, v in self.run_eval(state).items()})
        results.update(peak_memory(self.device))
        return results
