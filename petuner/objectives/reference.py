"""The reference model of DPO-style objectives, at no memory cost where the adapter allows.

- An adapter that switches off (``SwitchesOff``): the same model, adapter off, under ``no_grad``.
- A run continued from an SFT run (``init_from``): the policy starts from that adapter, and the
  reference is that adapter frozen — the trainable tensors' starting values swapped in for the
  reference's forward and the trained ones back after it (an adapter-sized copy, not a model).
  Switching the adapter off there would give the bare base (LLaMA-Factory#913).
- Full fine-tuning (``adapter=none``): a frozen copy of the model (one model's memory).
- ``precompute_reference``: the model as training starts (whatever the adapter) runs once over the
  training and held-out rows before the first step, and each row carries its values as a column (a pair's
  chosen and rejected; a KTO row's completion and KL row);
  no reference forward at training time, and no switch or copy needed. The values are kept with the
  tokenized data in memory, not in the on-disk cache: they depend on the weights, which the cache's
  key does not cover.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from petuner.adapters import adapter_layers
from petuner.adapters.capabilities import SwitchesOff
from petuner.errors import ConfigError
from petuner.objectives.pairs import sequence_logps
from petuner.train import fsdp
from petuner.train.device import autocast
from petuner.train.loop import to_device
from petuner.train.precision import full_finetuning


class SwitchedOff:
    """The policy model with its adapter switched off."""

    def __init__(self, model: nn.Module, method: SwitchesOff) -> None:
        self.model, self.method = model, method

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.method.switched_off(self.model):
            return sequence_logps(self.model, batch)[0]


class StartingAdapter:
    """The policy model with its trainable tensors at their values when training started."""

    def __init__(self, model: nn.Module, start: nn.Module | None = None) -> None:
        """``start``: a model of the same structure holding the starting values (default: ``model`` as it is)."""
        self.model = model
        self.start = {name: p.detach().clone() for name, p in (start or model).named_parameters() if p.requires_grad}

    def trainable(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's part of the trainable parameters as they are now, and of their starting values: FSDP
        replaces the parameters by shards after this reference is built (each rank then keeps its part of the
        start)."""
        params = dict(self.model.named_parameters())
        for name, start in self.start.items():
            self.start[name] = fsdp.laid_out_as(start, params[name])
        return ([fsdp.local(params[name].detach()) for name in self.start],
                [fsdp.local(start) for start in self.start.values()])

    @contextlib.contextmanager
    def started(self) -> Iterator[None]:
        """The starting values in place, and no dropout in the frozen adapter (TRL's disable_dropout)."""
        fsdp.regather(self.model)  # every parameter back to its shard (FSDP2 keeps the root's gathered)
        params, start = self.trainable()
        trained = [p.clone() for p in params]
        was_training = self.model.training
        with torch.no_grad():
            torch._foreach_copy_(params, start)
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)
            with torch.no_grad():
                torch._foreach_copy_(params, trained)
            fsdp.regather(self.model)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.started():
            return sequence_logps(self.model, batch)[0]


class FrozenCopy:
    """A frozen copy of the whole model (full fine-tuning)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logps(self.model, batch)[0]


Scores = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # (model, batch) -> [rows, values]


@torch.no_grad()
def _reference_column(model: nn.Module, dataset: Any, collate: Any, score: Scores, batch_size: int,
                      device: torch.device, compute_dtype: torch.dtype | None) -> Any:
    values: list[list[float]] = []
    for start in range(0, len(dataset), batch_size):
        batch = to_device(collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]), device)
        with autocast(device, compute_dtype):
            values += score(model, batch).float().tolist()
    return dataset.add_column("reference_logps", values)


def precompute_reference(model: nn.Module, data: Any, score: Scores, batch_size: int, device: torch.device,
                         compute_dtype: torch.dtype | None) -> None:
    """Each row's reference log-probabilities (``score``: a pair's chosen and rejected, a KTO row's completion
    and KL row) as a column of every split, from ``model`` as it is now (before training: the reference), in
    evaluation mode."""
    was_training = model.training
    model.eval()
    column = functools.partial(_reference_column, model, collate=data.collate, score=score, batch_size=batch_size,
                               device=device, compute_dtype=compute_dtype)
    data.train = column(data.train)
    data.set_evals({name: column(held_out) for name, held_out in data.evals.items()})
    model.train(was_training)


def outside_adapter_layers(model: nn.Module, heads: list[str]) -> list[str]:
    """Trainable parameters that no adapter layer owns (e.g. LoRA's bias=all): switching off keeps their training."""
    owned = {id(p) for _, layer in adapter_layers(model) for p in layer.adapter_parameters()}
    return [n for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in owned and not any(n.startswith(h + ".") for h in heads)]


def check_switch(method: Any) -> None:
    """Refuse, from the config alone, an adapter that gives no reference by switching off."""
    if full_finetuning(method):
        return
    if not isinstance(method, SwitchesOff):
        raise ConfigError(f"adapter={method.name} cannot switch itself off, so it gives no reference model; set "
                          "loss.precompute_reference=true (the starting model scores the data once), use loss=simpo "
                          "or loss=orpo (reference-free), or another adapter")
    refusal = method.switch_off_refusal()
    if refusal:
        raise ConfigError(refusal)


def build_reference(model: nn.Module, method: Any, continued: bool, heads: list[str]) -> Any:
    """The reference for this run's model and adapter (called after injection, before training)."""
    if continued:
        return StartingAdapter(model)
    if full_finetuning(method):
        return FrozenCopy(model)
    check_switch(method)
    outside = outside_adapter_layers(model, heads)
    if outside:
        raise ConfigError(f"adapter={method.name} also trains {outside[0]}, which switching the adapter off does "
                          "not undo, so the reference would not be the model training starts from "
                          "(set adapter.bias=none)")
    return SwitchedOff(model, method)
