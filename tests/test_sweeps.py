"""Sweeps through `train.py -m`: grids, optuna, parallel and cluster launchers, failures, the report."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from petuner.errors import PetunerError
from petuner.sweep import STATUS_FILE, run_job, sweep_report
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
# Even smaller than TINY: a sweep job is about the plumbing, not the training.
JOB = (*TINY, "data.limit=16", "data.eval_size=8", "trainer.max_steps=2")


def sweep(tmp_path: Path, *args: str) -> Path:
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *JOB, *args, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return sweep_dir


def jobs(sweep_dir: Path) -> dict[str, dict]:
    done = [p for p in sweep_dir.iterdir() if (p / STATUS_FILE).is_file()]
    return {p.name: json.loads((p / STATUS_FILE).read_text()) for p in done}


@pytest.mark.slow
def test_grid_with_a_failing_job_and_the_report(tmp_path) -> None:
    sweep_dir = sweep(tmp_path, "adapter=lora,dylora", "adapter.r=4,1000")
    status = jobs(sweep_dir)
    assert sorted(status) == ["0", "1", "2", "3"]
    failed = {name for name, s in status.items() if s["status"] == "failed"}
    assert len(failed) == 2 and all("adapter.r=1000 exceeds the size" in status[n]["error"] for n in failed)
    assert (sweep_dir / "multirun.yaml").is_file()

    report = sweep_report(sweep_dir)
    with open(sweep_dir / "sweep_report.csv") as handle:
        rows = {row["job"]: row for row in csv.DictReader(handle)}
    for name, row in rows.items():
        overrides = yaml.safe_load((sweep_dir / name / ".hydra" / "overrides.yaml").read_text())
        assert f"adapter={row['adapter']}" in overrides and f"adapter.r={row['adapter.r']}" in overrides
        if name in failed:
            assert row["status"] == "failed" and "exceeds the size" in row["error"] and row["eval/loss_after"] == ""
            continue
        info = json.loads((sweep_dir / name / "run.json").read_text())
        assert float(row["eval/loss_after"]) == info["results"]["eval/loss_after"]
        assert int(row["trainable_parameters"]) == info["trainable_parameters"]
        assert float(row["memory/optimizer_state_bytes"]) == info["results"]["memory/optimizer_state_bytes"]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    best = min(ok, key=lambda r: float(r["eval/loss_after"]))
    text = report.read_text()
    assert f"| **{best['job']}** |" in text and "Best: job " + best["job"] in text
    assert {p.name for p in sweep_dir.glob("sweep_*.png")} == {"sweep_adapter.png", "sweep_adapter_r.png"}


@pytest.mark.slow
def test_optuna_search_returns_the_objective(tmp_path) -> None:
    sweep_dir = sweep(tmp_path, "sweep=lora_search", "hydra.sweeper.n_trials=3")
    assert len(jobs(sweep_dir)) == 3
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    losses = [json.loads((p / "run.json").read_text())["results"]["eval/loss_after"]
              for p in sweep_dir.iterdir() if (p / "run.json").is_file()]
    assert results["best_value"] == pytest.approx(min(losses))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "ray"])
def test_launchers_run_the_same_jobs(tmp_path, launcher: str) -> None:
    extra = {"joblib": ["hydra.launcher.n_jobs=2"], "submitit_local": ["hydra.launcher.timeout_min=10"],
             "ray": ["+hydra.launcher.ray.init.num_cpus=2"]}[launcher]
    sweep_dir = sweep(tmp_path, f"hydra/launcher={launcher}", *extra, "adapter.r=2,4")
    status = jobs(sweep_dir)
    assert sorted(status) == ["0", "1"] and all(s["status"] == "ok" for s in status.values())
    ranks = sorted(yaml.safe_load((sweep_dir / n / "config.yaml").read_text())["adapter"]["r"] for n in status)
    assert ranks == [2, 4]


def test_sweep_jobs_share_a_wandb_group_and_record_failure(cfg_factory, tmp_path) -> None:
    cfg = cfg_factory("adapter.r=1000", "logger=wandb")
    assert math.isnan(run_job(cfg, sweep_dir=str(tmp_path / "2026-11-25_12-00-00")))
    assert cfg.logger.wandb.group == "2026-11-25_12-00-00"
    assert json.loads((tmp_path / "run" / STATUS_FILE).read_text())["status"] == "failed"
    with pytest.raises(PetunerError, match="exceeds the size"):  # outside a sweep the error propagates
        run_job(cfg_factory("adapter.r=1000"))


def test_report_on_a_folder_without_jobs(tmp_path) -> None:
    with pytest.raises(PetunerError, match="holds no sweep jobs"):
        sweep_report(tmp_path)
