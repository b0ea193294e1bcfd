"""What every preference objective shares: one concatenated forward of a batch of pairs, each completion's
log-probability from the labelled positions only, the reference's, and the rewards logged and evaluated.

A batch (``petuner.data.preference.PairCollator``) holds B chosen rows then B rejected rows; the policy
runs once over all 2B (TRL's concatenated forward), the output layer only at completion positions and
in chunks (``petuner.train.labelled_logits.token_logps``). An objective's ``pair_loss`` turns the
log-probabilities into a loss per pair and the rewards; the mean over pairs is the batch's loss, to which
an optional SFT term on the chosen replies is added (``rpo_alpha``: TRL's name). Metrics follow TRL's
names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from petuner.choices import PREFERENCE_METRICS
from petuner.data.sft import IGNORE
from petuner.errors import ConfigError
from petuner.objectives.schema import RegisteredObjective
from petuner.train.labelled_logits import token_logps

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")
log = logging.getLogger(__name__)


@dataclass
class Logps:
    """Summed completion log-probabilities and completion token counts, chosen and rejected (B each)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def of(cls, sums: torch.Tensor, counts: torch.Tensor) -> Logps:
        half = sums.shape[0] // 2
        return cls(sums[:half], sums[half:], counts[:half], counts[half:])

    def mean(self) -> Logps:
        """Per-token averages (SimPO's and ORPO's length normalisation)."""
        return Logps(self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens,
                     self.chosen_tokens, self.rejected_tokens)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed completion log-probability and its completion token count (one forward)."""
    with token_logps(model):
        per_position = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).loss
    return per_position.sum(-1), completion_tokens(batch)


def completion_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's labelled next-token positions: its completion's length."""
    return (batch["labels"][:, 1:] != IGNORE).sum(-1).float()


Reference = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # batch -> the reference's summed logps (2B)


class Pairs(RegisteredObjective):
    """What every objective on preference pairs shares: the pair counts, the checks, the evaluation sums."""

    data_kinds: ClassVar[tuple[str, ...]] = ("preference",)
    measures: ClassVar[tuple[str, ...]] = PREFERENCE_METRICS
    metrics: ClassVar[tuple[str, ...]] = METRICS  # what it logs and evaluates, summed over pairs
    task: ClassVar[str] = "causal_lm"  # the model task it trains
    task_note: ClassVar[str] = "a causal language model on preference pairs"

    def check_run(self, task: str, method: Any, data: Any, continued: bool) -> None:
        if task != self.task:
            raise ConfigError(f"loss={self.name} trains {self.task_note}, but model.task={task}; "
                              f"use a model config with task: {self.task}")
        super().check_run(task, method, data, continued)
        if data.packing:
            raise ConfigError(f"data.packing=true packs single sequences; loss={self.name} trains on pairs "
                              "(set data.packing=false)")

    uses_margin: ClassVar[bool] = False  # reads the data's per-pair margin column (the reward model does)

    def prepare_data(self, data: Any, tokenizer: Any, max_length: int) -> None:
        if "margin" in data.train.column_names and not self.uses_margin:
            log.warning("the data's margin column is a reward model's (loss=reward); loss=%s does not use it",
                        self.name)

    def items(self, batch: dict[str, torch.Tensor], kind: str) -> int:
        return batch["input_ids"].shape[0] // 2

    def reference_scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What ``loss.precompute_reference`` keeps of each pair: its chosen and rejected log-probabilities."""
        return torch.stack(sequence_logps(model, batch)[0].chunk(2), dim=1)

    def eval_keys(self, kind: str) -> tuple[str, ...]:
        return ("loss", "items", *self.metrics)

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
        loss, sums = self.loss(model, batch)
        pairs = self.items(batch, kind)
        return {"loss": loss.double() * pairs, "items": torch.tensor(float(pairs), dtype=torch.float64), **sums}

    def eval_metrics(self, kind: str, prefix: str, sums: dict[str, float]) -> dict[str, float]:
        return {f"{prefix}/{key}": sums[key] / sums["items"] for key in ("loss", *self.metrics)}


class PairObjective(Pairs):
    """A policy objective on pairs (DPO, SimPO, ORPO): ``pair_loss`` is all a subclass writes."""

    reference: Reference | None = None  # set by the run where ``needs_reference``

    def check_run(self, task: str, method: Any, data: Any, continued: bool) -> None:
        super().check_run(task, method, data, continued)
        if self.needs_reference and not continued and not self.cfg.get("precompute_reference"):
            from petuner.objectives.reference import check_switch

            check_switch(method)

    @abstractmethod
    def pair_loss(self, policy: Logps, reference: Logps | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss per pair, chosen rewards, rejected rewards), B each."""

    def reference_logps(self, batch: dict[str, torch.Tensor], counts: torch.Tensor) -> Logps | None:
        if not self.needs_reference:
            return None
        if "reference_logps" in batch:
            return Logps.of(batch["reference_logps"].float(), counts)
        assert self.reference is not None, "a reference objective needs its reference model set by the run"
        with torch.no_grad():
            return Logps.of(self.reference(batch).float(), counts)

    def sft_weight(self) -> float:
        return float(self.cfg.get("rpo_alpha") or 0.0)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # the reference first: a reference that swaps weights in place must not touch those the policy's
        # graph has saved for its backward pass
        reference = self.reference_logps(batch, completion_tokens(batch))
        policy = Logps.of(*sequence_logps(model, batch))
        losses, chosen, rejected = self.pair_loss(policy, reference)
        loss = losses.mean()
        if self.sft_weight():  # NLL of the chosen replies, mean over their tokens
            loss = loss - self.sft_weight() * policy.chosen.sum() / policy.chosen_tokens.sum()
        return loss, metric_sums(policy, chosen.detach(), rejected.detach())


def metric_sums(policy: Logps, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's metrics, summed over the batch's pairs (the loop divides by the step's pairs)."""
    return {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
            "rewards/margins": (chosen - rejected).sum(), "rewards/accuracies": (chosen > rejected).float().sum(),
            "logps/chosen": policy.chosen.detach().sum(), "logps/rejected": policy.rejected.detach().sum()}
