"""Metrics sinks: ``metrics.jsonl`` in every run folder, plus wandb (offline by default) if chosen."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petuner.errors import ConfigError
from petuner.io import METRICS_FILE
from petuner.schema import choice, items
from petuner.train import distributed


@dataclass
class LoggerSchema:
    """``logger=none``: only metrics.jsonl. Each logger's schema (``conf/logger/<name>.yaml`` names
    ``<name>_schema``) subclasses it."""

    name: str = "none"
    group: str | None = None  # the runs' group (a sweep sets its folder's name): for loggers that group runs


@dataclass
class WandbSchema(LoggerSchema):
    name: str = "wandb"
    project: str = "petuner"
    mode: str = choice("offline", ("offline", "online", "disabled"))
    tags: list[str] = items(list)


LOGGERS: dict[str, type[LoggerSchema]] = {"wandb": WandbSchema, "none": LoggerSchema}


class MetricsLog:
    """Appends one JSON object per logged event; wandb mirrors it when configured."""

    def __init__(self, run_dir: Path, cfg: Any, run_config: dict[str, Any], resume_step: int | None = None):
        if cfg.name not in LOGGERS:
            raise ConfigError(f"logger={cfg.name!r}: allowed: {', '.join(LOGGERS)}")
        self.path = Path(run_dir) / METRICS_FILE
        self.wandb: Any = None
        self.enabled = distributed.is_writer()  # one metrics.jsonl and one wandb run: rank 0's
        if not self.enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        else:  # a fresh start: whatever an attempt that died before its first checkpoint logged is void
            self.path.unlink(missing_ok=True)
        if cfg.name == "wandb" and cfg.mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            import wandb

            self.wandb = wandb.init(project=cfg.project, group=cfg.group, tags=list(cfg.tags),
                                    mode=cfg.mode, dir=str(run_dir), name=Path(run_dir).name,
                                    config=run_config, resume="allow", id=_wandb_id(run_dir))

    def _truncate_after(self, step: int) -> None:
        """On resume, forget what was logged after the checkpoint: it is about to be redone."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run folder, so a resumed run continues the same wandb run."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
