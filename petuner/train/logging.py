"""Metrics sinks: ``metrics.jsonl`` in every run folder, plus any of wandb, TensorBoard, MLflow and CSV.

The ``logger`` config group holds one entry per chosen sink (``logger=[tensorboard,mlflow]`` selects
several; ``logger=none`` none). Each sink is the library made for it: wandb (offline by default),
``torch.utils.tensorboard`` event files under ``RUN_DIR/tensorboard``, an MLflow file store (default
``RUN_DIR/mlruns``), and a long-format ``RUN_DIR/metrics.csv`` (``step,name,value``: the set of
metrics differs between training steps and evaluations, so one row per value needs no header change).

On resume every sink forgets what was logged after the checkpoint where it can: the JSONL and CSV
files are cut, TensorBoard purges later steps (``purge_step``); MLflow cannot delete metric points, so
the resumed run continues the same MLflow run and a redone step appears twice in its history.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petuner.errors import ConfigError
from petuner.io import METRICS_FILE, atomic_write_json
from petuner.schema import choice, items, number
from petuner.train import distributed

CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run.json"


@dataclass
class WandbSchema:
    project: str = "petuner"
    mode: str = choice("offline", ("offline", "online", "disabled"))
    group: str | None = None  # the runs' group (a sweep sets its folder's name)
    tags: list[str] = items(list)


@dataclass
class TensorBoardSchema:
    flush_secs: int = number(30, integer=True)


@dataclass
class MlflowSchema:
    tracking_uri: str | None = None  # null: a file store in the run folder
    experiment: str = "petuner"


@dataclass
class CsvSchema:
    pass


@dataclass
class LoggerSchema:
    """The ``logger`` group: one entry per chosen sink (``conf/logger/<name>.yaml`` each add theirs;
    ``logger=[tensorboard,csv]`` composes several). Checked by ``petuner.config.validate``."""

    wandb: WandbSchema | None = None
    tensorboard: TensorBoardSchema | None = None
    mlflow: MlflowSchema | None = None
    csv: CsvSchema | None = None


class Sink:
    """One metrics destination besides metrics.jsonl."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def summary(self, values: dict[str, Any]) -> None:
        """Final results (run.json's ``results``)."""

    def close(self) -> None:
        """Flush and release."""


class WandbSink(Sink):
    def __init__(self, run_dir: Path, cfg: Any, run_config: dict[str, Any], resume_step: int | None):
        import wandb

        self.run = wandb.init(project=cfg.project, group=cfg.get("group"), tags=list(cfg.get("tags") or []),
                              mode=cfg.mode, dir=str(run_dir), name=Path(run_dir).name,
                              config=run_config, resume="allow", id=_stable_id(run_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink(Sink):
    def __init__(self, run_dir: Path, cfg: Any, run_config: dict[str, Any], resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None  # steps after the checkpoint are redone
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge,
                                    flush_secs=int(cfg.flush_secs))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class MlflowSink(Sink):
    def __init__(self, run_dir: Path, cfg: Any, run_config: dict[str, Any], resume_step: int | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = cfg.get("tracking_uri") or (Path(run_dir) / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch (no database needed)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(cfg.experiment))
        id_file = Path(run_dir) / MLFLOW_RUN_FILE
        if resume_step is not None and id_file.is_file():  # continue the run a resumed training started
            self.run_id = json.loads(id_file.read_text())["run_id"]
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=Path(run_dir).name).info.run_id
            atomic_write_json(id_file, {"tracking_uri": uri, "run_id": self.run_id})
            params = [Param(key, str(value)[:6000]) for key, value in _flatten(run_config).items()]
            self.client.log_batch(self.run_id, params=params)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _millis()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class CsvSink(Sink):
    def __init__(self, run_dir: Path, cfg: Any, run_config: dict[str, Any], resume_step: int | None):
        self.path = Path(run_dir) / CSV_FILE
        rows = _read_csv(self.path) if resume_step is not None else []
        kept = [row for row in rows if int(row["step"]) <= resume_step] if resume_step is not None else []
        with open(self.path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("step", "name", "value"))
            writer.writerows((row["step"], row["name"], row["value"]) for row in kept)

    def log(self, metrics: dict[str, float], step: int) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerows((step, name, repr(float(value))) for name, value in metrics.items())


SINKS: dict[str, Callable[..., Sink]] = {"wandb": WandbSink, "tensorboard": TensorBoardSink,
                                         "mlflow": MlflowSink, "csv": CsvSink}
LOGGERS = (*SINKS, "none")


def logger_names(cfg: Any) -> list[str]:
    """The chosen sinks, in order; one line naming the allowed ones for anything else."""
    names = [str(name) for name, value in cfg.items() if value is not None]
    for name in names:
        if name not in SINKS:
            raise ConfigError(f"logger {name!r} is unknown; allowed: {', '.join(LOGGERS)} "
                              "(several at once: logger=[tensorboard,csv])")
    return names


class MetricsLog:
    """Appends one JSON object per logged event to metrics.jsonl and mirrors it to the chosen sinks."""

    def __init__(self, run_dir: Path, cfg: Any, run_config: dict[str, Any], resume_step: int | None = None):
        names = logger_names(cfg)
        self.path = Path(run_dir) / METRICS_FILE
        self.sinks: list[Sink] = []
        self.enabled = distributed.is_writer()  # one metrics.jsonl and one set of sinks: rank 0's
        if not self.enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        else:  # a fresh start: whatever an attempt that died before its first checkpoint logged is void
            self.path.unlink(missing_ok=True)
        disabled = {"wandb"} if os.environ.get("WANDB_MODE") == "disabled" or \
            ("wandb" in names and cfg.wandb.mode == "disabled") else set()
        self.sinks = [SINKS[name](run_dir, cfg[name], run_config, resume_step)
                      for name in names if name not in disabled]

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
        for sink in self.sinks:
            sink.log(metrics, step)

    def logged_at(self, step: int) -> dict[str, float]:
        """What metrics.jsonl holds for ``step`` (a resumed run's evaluation before training); rank 0's file."""
        if not self.enabled or not self.path.exists():
            return {}
        records = [r for r in read_metrics(self.path.parent) if r["step"] == step]
        return {k: float(v) for r in records for k, v in r.items() if k != "step"}

    def summary(self, values: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.summary(values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _millis() -> int:
    import time

    return int(time.time() * 1000)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _stable_id(run_dir: Path) -> str:
    """A stable id per run folder, so a resumed run continues the same wandb run."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
