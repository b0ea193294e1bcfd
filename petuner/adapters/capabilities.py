"""What only some adapter methods do: small capability classes a method derives from besides
``AdapterMethod``; callers ask with ``isinstance`` (``isinstance(method, RankDynamic)``)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from petuner.adapters.base import disabled_adapters


class RankDynamic(ABC):
    """A method whose trained adapter runs at any of several ranks (DyLoRA)."""

    @abstractmethod
    def ranks(self) -> list[int]:
        """The ranks a trained adapter can run at."""

    @abstractmethod
    def set_rank(self, model: nn.Module, rank: int) -> None:
        """Run every adapter layer at ``rank`` (evaluation and export at that rank)."""


class OwnsOptimizerParameters(ABC):
    """A method that updates some of its trainable parameters itself, in a hook (SoRA's gates)."""

    @abstractmethod
    def own_optimizer_parameters(self, model: nn.Module) -> list[str]:
        """Names of the parameters the main optimizer must leave alone."""


class PreparesFromData(ABC):
    """A method that looks at the whole base model, and possibly training batches, before injection
    (LQ-LoRA decomposes its targets' weights, optionally Fisher-weighted)."""

    @abstractmethod
    def calibration_batches(self) -> int:
        """How many training batches ``prepare`` needs (0: none)."""

    @abstractmethod
    def prepare(self, model: nn.Module, calibration: Sequence[dict[str, torch.Tensor]],
                exclude: Sequence[str] = ()) -> None:
        """Work on the base model before ``apply``; ``apply`` calls it with no batches where nobody did
        (``petuner.load``: what needs data comes from the training run's cache)."""


class QuantizedBase(ABC):
    """A method whose targets' base weights are stored quantized (QLoRA, LQ-LoRA): the merged export holds
    them dequantized, and a peft export needs the same quantized base to mean the same thing."""

    @abstractmethod
    def export_note(self, fmt: str) -> str:
        """What a user of an export in format ``fmt`` must know about the quantized base."""

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """What the quantization decided, for run.json (bits per parameter, per-matrix configs)."""

    def restore(self, report: dict[str, Any]) -> None:  # noqa: B027 (optional: most methods decide nothing)
        """Before injection when a run is loaded: take what ``report`` said in training instead of deciding
        again (LQ-LoRA builds its saved per-matrix configs rather than recomputing them)."""


class PeftNative(ABC):
    """A method living in peft's own layers (``adapter=peft``): peft itself writes its export."""

    @abstractmethod
    def peft_model(self, model: nn.Module, task: str, head_modules: Sequence[str], base_model: str | None,
                   load_base: Callable[[], nn.Module]) -> Any:
        """A ``peft.PeftModel`` over ``load_base()`` holding ``model``'s trained adapter."""


class SwitchesOff(ABC):  # noqa: B024 (a capability with working defaults: a method opts in by deriving)
    """A method whose adapter switches off to the model it started from (its layers' ``disabled`` state): a
    preference objective's reference model at no memory cost, the same weights with the adapter off."""

    def switch_off_refusal(self) -> str | None:
        """Why this configuration cannot switch off to its starting model; None when it can."""
        return None

    @contextlib.contextmanager
    def switched_off(self, model: nn.Module) -> Iterator[None]:
        """The model with every adapter layer off (merged ones unmerged), restored exactly on exit."""
        with disabled_adapters(model):
            yield


class ComposesRuns(ABC):
    """A method built over earlier runs' updates (aTLAS). Whoever builds it for training reads the runs it names
    (``sources``, checked to share the base) and hands over their per-module (A, B) factors (``compose``) before
    injection; a reload instead gets their shapes back from run.json (``report`` / ``restore``) and the tensors
    from the saved adapter, so the source folders are needed only to train."""

    @abstractmethod
    def sources(self) -> list[str]:
        """The run folders whose updates this method composes."""

    @abstractmethod
    def compose(self, updates: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Each source's (A, B) per module, its scale folded into B (ΔW = B @ A)."""

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """What a reload needs to rebuild the layers' shapes, for run.json."""

    @abstractmethod
    def restore(self, report: dict[str, Any]) -> None:
        """Take the shapes ``report`` saved (before injection, when a run is loaded)."""
