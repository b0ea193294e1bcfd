"""Loggers: TensorBoard's event file, MLflow's file store and the CSV hold exactly metrics.jsonl's values,
several loggers run at once, and a resumed run's TensorBoard drops the steps it redoes."""

from __future__ import annotations

import csv
import json
import math

import pytest

from petuner.config import check_command_line
from petuner.errors import ConfigError
from petuner.run import run
from petuner.train.logging import read_metrics

LOGGERS = "logger=[tensorboard,mlflow,csv]"


def jsonl_values(run_dir) -> dict[tuple[str, int], float]:
    return {(k, m["step"]): float(v) for m in read_metrics(run_dir) for k, v in m.items()
            if k != "step" and isinstance(v, (int, float))}


def tensorboard_values(run_dir) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def mlflow_values(run_dir) -> dict[tuple[str, int], float]:
    from mlflow.tracking import MlflowClient

    ids = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    keys = client.get_run(ids["run_id"]).data.metrics
    return {(k, m.step): m.value for k in keys for m in client.get_metric_history(ids["run_id"], k)}


def csv_values(run_dir) -> dict[tuple[str, int], float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return {(row["name"], int(row["step"])): float(row["value"]) for row in csv.DictReader(handle)}


def same(a: dict, b: dict, rel: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=rel) for k in a)


def test_every_logger_holds_the_values_of_metrics_jsonl(cfg_factory, tmp_path) -> None:
    run(cfg_factory(LOGGERS, "trainer.eval_every=2"))
    run_dir = tmp_path / "run"
    expected = jsonl_values(run_dir)
    assert ("train/loss", 6) in expected and ("eval/loss", 2) in expected
    assert same(csv_values(run_dir), expected)
    assert same(mlflow_values(run_dir), expected)
    assert same(tensorboard_values(run_dir), expected, rel=1e-6)  # TensorBoard stores float32


def test_a_resumed_run_logs_each_step_once(cfg_factory, tmp_path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from petuner.train import loop as loop_module
    from tests.conftest import Crash

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(cfg_factory(LOGGERS, run_dir=straight))
    original = loop_module.save_checkpoint

    def die_before_the_last_checkpoint(run_dir, step, *args, **kwargs):
        if step == 6:  # steps 4-6 were logged; the resumed run redoes them from step 3's checkpoint
            raise Crash(step)
        return original(run_dir, step, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(loop_module, "save_checkpoint", die_before_the_last_checkpoint)
        with pytest.raises(Crash):
            run(cfg_factory(LOGGERS, run_dir=resumed))
    run(cfg_factory(LOGGERS, "trainer.resume=true", run_dir=resumed))
    events = EventAccumulator(str(resumed / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [(tag, e.step) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)]
    assert len(steps) == len(set(steps))  # the steps redone after the checkpoint were purged
    with open(resumed / "metrics.csv", newline="") as handle:
        rows = [(row["name"], int(row["step"])) for row in csv.DictReader(handle)]
    assert len(rows) == len(set(rows))
    exact = lambda values: {k: v for k, v in values.items() if not k[0].startswith(("train/tokens", "train/step",  # noqa: E731
                                                                                    "memory/"))}
    assert exact(jsonl_values(resumed)) == exact(jsonl_values(straight))
    for read in (tensorboard_values, csv_values):
        assert read(resumed).keys() == read(straight).keys()
        assert same(exact(read(resumed)), exact(jsonl_values(resumed)), rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["logger=[tensorboard,mlfow]"], "logger='mlfow' is not a choice of the 'logger' config group; allowed: "
                                     "csv, mlflow, none, tensorboard, wandb"),
    (["logger=neptune"], "logger='neptune' is not a choice of the 'logger' config group; allowed: "
                         "csv, mlflow, none, tensorboard, wandb"),
])
def test_unknown_logger_is_one_line(args, message) -> None:
    with pytest.raises(ConfigError) as err:
        check_command_line(args)
    assert str(err.value) == message


def test_unknown_logger_entry_in_code_is_one_line_before_anything_is_written(cfg_factory, tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        run(cfg_factory("+logger.neptune={}"))
    assert str(err.value) == ("logger.neptune is not an option of the logger schema; "
                              "allowed: wandb, tensorboard, mlflow, csv")
    assert not (tmp_path / "run").exists()
