"""``loss=kto``: Kahneman-Tversky Optimization (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization", Eq. 7), on unpaired completions each labelled desirable or not, with TRL's
KTOTrainer's definitions and names.

Each completion's reward is r = log π/π_ref; the reference point z is the batch's KL estimate: the mean of
log π/π_ref over its rows' mismatched (prompt_i, completion_{i−1}) KL rows (``petuner.data.unpaired``),
clamped at 0 and detached, as TRL computes it. In training the mean runs over the step's micro-batch on every
process (TRL gathers it over processes too), so two processes train as one. The loss of a row is
desirable_weight·(1 − σ(β(r − z))) when desirable, undesirable_weight·(1 − σ(β(z − r))) when not; the batch's
loss is their mean over rows. The reference is the same as DPO's (``petuner.objectives.reference``: the adapter
switched off, the continued run's adapter, a frozen copy, or ``precompute_reference``'s values of each row and
its KL row). Logged as TRL does: rewards/* and logps/* are means over the batch's desirable (chosen) and
undesirable (rejected) rows, and ``kl`` the estimate z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from petuner.objectives.pairs import Pairs, sequence_logps
from petuner.objectives.registry import register_objective
from petuner.objectives.schema import ObjectiveSchema
from petuner.schema import flag, number
from petuner.train import distributed

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")
KL_INPUTS = {"input_ids": "kl_input_ids", "attention_mask": "kl_attention_mask", "labels": "kl_labels"}
# per-class figures: the metric, the class count it is a mean over (summed over a batch's rows)
PER_CLASS = {"rewards/chosen": "chosen_items", "logps/chosen": "chosen_items",
             "rewards/rejected": "rejected_items", "logps/rejected": "rejected_items"}


@dataclass
class KTOSchema(ObjectiveSchema):
    name: str = "kto"
    beta: float = number(0.1)  # > 0: how tightly the policy stays near the reference
    desirable_weight: float = number(1.0)  # > 0: λ_D, the weight of the desirable rows' losses
    undesirable_weight: float = number(1.0)  # > 0: λ_U, the weight of the undesirable rows' losses
    precompute_reference: bool = flag(False)  # the reference's log-probabilities computed once, before training


def kto_losses(beta: float, desirable_weight: float, undesirable_weight: float, logratios: torch.Tensor,
               kl: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    """The loss per row (TRL's KTOTrainer, ``loss_type="kto"``)."""
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, chosen, rejected)


def kl_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's mismatched (prompt_i, completion_{i-1}) rows as model inputs."""
    return {ours: batch[theirs] for ours, theirs in KL_INPUTS.items()}


@register_objective
class KTO(Pairs):
    name = "kto"
    schema: ClassVar[type] = KTOSchema
    needs_reference: ClassVar[bool] = True
    data_kinds: ClassVar[tuple[str, ...]] = ("unpaired", "preference")
    data_note: ClassVar[str] = "{prompt, completion, label} rows, or {prompt, chosen, rejected} pairs"
    measures: ClassVar[tuple[str, ...]] = ("eval/loss", "eval/rewards/margins")
    metrics: ClassVar[tuple[str, ...]] = METRICS
    reference: Any = None  # set by the run

    def check_run(self, task: str, method: Any, data: Any, continued: bool) -> None:
        super().check_run(task, method, data, continued)
        if not continued and not self.cfg.precompute_reference:
            from petuner.objectives.reference import check_switch

            check_switch(method)

    def prepare_data(self, data: Any, tokenizer: Any, max_length: int) -> None:
        """Every split as KTO's rows (pairs unpaired, each row with its KL row), and their collator."""
        from petuner.data.unpaired import KTOCollator, kto_rows

        super().prepare_data(data, tokenizer, max_length)
        data.train = kto_rows(data.train)  # (data.trains, each source's before mixing, are left as built)
        data.set_evals({name: kto_rows(split) for name, split in data.evals.items()})
        data.report.update(train_examples=len(data.train), eval_examples=len(data.eval))
        data.kind, data.collate = "unpaired", KTOCollator(tokenizer.pad_token_id, max_length)

    def items(self, batch: dict[str, torch.Tensor], kind: str) -> int:
        return batch["desirable"].shape[0]

    def reference_scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What ``loss.precompute_reference`` keeps of each row: its completion's and its KL row's log-probabilities."""
        return torch.stack([sequence_logps(model, batch)[0], sequence_logps(model, kl_rows(batch))[0]], dim=1)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's log-probabilities of the rows and of their KL rows: precomputed, or run now."""
        if "reference_logps" in batch:
            return batch["reference_logps"].float(), batch["reference_kl_logps"].float()
        assert self.reference is not None, "KTO needs its reference model set by the run"
        with torch.no_grad():
            return self.reference(batch).float(), self.reference(kl_rows(batch)).float()

    def figures(self, model: nn.Module, batch: dict[str, torch.Tensor],
                over_ranks: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's mean loss and its figures summed over rows, with the class counts; ``over_ranks``: the
        KL estimate over every process's rows (in training, where every process runs the same micro-batches)."""
        reference, reference_kl = self.reference_logps(batch)  # the reference first, as in PairObjective.loss
        with torch.no_grad():  # the KL rows carry no gradient
            kl_sum = (sequence_logps(model, kl_rows(batch))[0].float() - reference_kl).sum()
            total = torch.stack([kl_sum, torch.tensor(float(len(reference_kl)), device=kl_sum.device)])
            kl_sum, kl_rows_counted = distributed.sum_over_ranks(total) if over_ranks else total
            kl = (kl_sum / kl_rows_counted).clamp(min=0)
        policy = sequence_logps(model, batch)[0].float()
        desirable = batch["desirable"].bool()
        cfg = self.cfg
        losses = kto_losses(float(cfg.beta), float(cfg.desirable_weight), float(cfg.undesirable_weight),
                            policy - reference, kl, desirable)
        rewards, logps = float(cfg.beta) * (policy - reference).detach(), policy.detach()
        chosen, rejected = desirable.float(), (~desirable).float()
        return losses.mean(), {
            "rewards/chosen": (rewards * chosen).sum(), "rewards/rejected": (rewards * rejected).sum(),
            "logps/chosen": (logps * chosen).sum(), "logps/rejected": (logps * rejected).sum(),
            "kl": kl * len(losses), "chosen_items": chosen.sum(), "rejected_items": rejected.sum()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loop divides each figure by the step's rows: per-class means are scaled to that (exactly TRL's
        figures for a step of one batch)."""
        loss, sums = self.figures(model, batch, over_ranks=True)
        return loss, {key: value * len(batch["desirable"]) for key, value in means(sums).items()}

    def eval_keys(self, kind: str) -> tuple[str, ...]:
        return ("loss", "items", *(k for k in METRICS if k != "rewards/margins"), "chosen_items", "rejected_items")

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
        loss, sums = self.figures(model, batch, over_ranks=False)
        rows = self.items(batch, kind)
        return {"loss": loss.double() * rows, "items": torch.tensor(float(rows), dtype=torch.float64), **sums}

    def eval_metrics(self, kind: str, prefix: str, sums: dict[str, float]) -> dict[str, float]:
        figures = means(sums)
        return {f"{prefix}/loss": sums["loss"] / sums["items"], **{f"{prefix}/{k}": figures[k] for k in METRICS}}


def means(sums: dict[str, Any]) -> dict[str, Any]:
    """Per-class means of the summed figures (0 where a class is absent, as TRL's nansum), their margin, and
    ``kl`` (summed as each batch's estimate × its rows) over the rows."""
    # an absent class sums to 0 over 0 rows: divided by 1 instead (no host sync on a device tensor)
    out = {key: sums[key] / (sums[count] + (sums[count] == 0)) for key, count in PER_CLASS.items()}
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    out["kl"] = sums["kl"] / (sums["chosen_items"] + sums["rejected_items"])
    return out

