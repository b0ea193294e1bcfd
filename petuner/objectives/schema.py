"""What every objective's schema has, and the base class the registry's entries share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from omegaconf import DictConfig

from petuner.choices import LANGUAGE_METRICS
from petuner.errors import ConfigError
from petuner.schema import conform
from petuner.train.objective import Objective


@dataclass
class ObjectiveSchema:
    name: str = ""


class RegisteredObjective(Objective):
    """An objective configured from ``conf/loss/<name>.yaml``: its options, the data it trains on, the task."""

    name: ClassVar[str]
    schema: ClassVar[type] = ObjectiveSchema
    data_kinds: ClassVar[tuple[str, ...]] = ()  # the data kinds it trains on; (): any but preference pairs
    needs_reference: ClassVar[bool] = False
    data_note: ClassVar[str] = "{prompt, chosen, rejected} rows"  # the rows of data_kinds, as error lines name them
    measures: ClassVar[tuple[str, ...]] = LANGUAGE_METRICS  # what `objective=` (sweeps, best/) may follow

    def __init__(self, cfg: DictConfig | dict[str, Any]) -> None:
        self.cfg = conform(self.schema, cfg, "loss", f"loss={self.name}")

    def check_run(self, task: str, method: Any, data: Any, continued: bool) -> None:
        """Refuse, from the config alone, a model, adapter or data setting this objective cannot train with."""
        if data.kind != "auto":
            self.check_data_kind(data.kind)

    def check_data_kind(self, kind: str) -> None:
        """Refuse data this objective cannot train on (known once the columns are read, before tokenizing)."""
        if self.data_kinds and kind not in self.data_kinds:
            raise ConfigError(f"loss={self.name} trains on {' or '.join(self.data_kinds)} data ({self.data_note}), "
                              f"but the data is of kind {kind}")
        if not self.data_kinds and kind == "preference":
            raise ConfigError("the data holds preference pairs (chosen, rejected): train them with loss=dpo, "
                              f"simpo, orpo, kto or reward, not loss={self.name}")
        if kind == "unpaired" and "unpaired" not in self.data_kinds:
            raise ConfigError("the data holds labelled completions (prompt, completion, label): train them with "
                              f"loss=kto, not loss={self.name}")
