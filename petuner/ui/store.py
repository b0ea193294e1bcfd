"""Read the run store (``adapters/``): which runs exist, how far each got, its curves, log and results.

Everything comes from the ordinary run folder files (``config.yaml``, ``run.json``, ``metrics.jsonl``,
``status.json``) and the launcher's two (``launch.json``, ``console.log``), so runs started from a terminal,
by a sweep or by an earlier UI server show the same way. Nothing here writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from petuner.io import CONFIG_FILE, METRICS_FILE, RUN_FILE
from petuner.sweep import STATUS_FILE
from petuner.ui.launcher import CONSOLE_FILE, LAUNCH_FILE, is_running, read_launch

SWEEPS = "sweeps"  # STORE/sweeps/<time>/<job>: Hydra's -m folders


@dataclass
class RunState:
    """Where one run stands."""

    path: Path
    status: str  # running | finished | aborted | failed | starting
    error: str  # the run's one-line error (failed, aborted), else ""
    step: int  # the last logged optimizer step
    max_steps: int | None
    eta_s: float | None  # seconds left at the recent pace, while running


def run_dirs(store: Path) -> list[Path]:
    """Run folders of the store, newest first: launched from the page, or holding a run's config."""
    if not store.is_dir():
        return []
    found = [p for p in store.iterdir() if p.is_dir() and p.name != SWEEPS
             and ((p / CONFIG_FILE).is_file() or (p / LAUNCH_FILE).is_file())]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def sweep_dirs(store: Path) -> list[Path]:
    folder = store / SWEEPS
    return sorted((p for p in folder.iterdir() if p.is_dir()), reverse=True) if folder.is_dir() else []


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line being written at this moment (incomplete) is skipped."""
    path = run_dir / METRICS_FILE
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def metrics_mark(run_dir: Path) -> str:
    """Changes whenever metrics.jsonl does (size and modification time)."""
    path = run_dir / METRICS_FILE
    stat = path.stat() if path.is_file() else None
    return f"{stat.st_size}:{stat.st_mtime_ns}" if stat else ""


def run_config(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def log_tail(run_dir: Path, lines: int = 40) -> str:
    path = run_dir / CONSOLE_FILE
    if not path.is_file():
        return ""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 64 * 1024))
        text = handle.read().decode(errors="replace")
    # a progress bar rewrites its line after carriage returns: keep its latest state
    shown = [next((part for part in reversed(line.split("\r")) if part.strip()), "") for line in text.split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])


def error_line(run_dir: Path) -> str:
    """The run's one line: ``error: ...`` as the command line printed it, else the last line it wrote."""
    tail = log_tail(run_dir, 200).splitlines()
    errors = [line for line in tail if line.startswith("error: ")]
    if errors:
        return errors[-1]
    status = read_json(run_dir / STATUS_FILE)
    if status.get("error"):
        return f"error: {status['error']}"
    return tail[-1] if tail else "error: the run ended without a word (killed?)"


def state(run_dir: Path) -> RunState:
    records = metrics(run_dir)
    steps = [r for r in records if "train/loss" in r]
    step = int(steps[-1]["step"]) if steps else 0
    max_steps = (run_config(run_dir).get("trainer") or {}).get("max_steps")
    info = read_json(run_dir / RUN_FILE)
    launch = read_launch(run_dir) or {}
    if is_running(run_dir):
        status, error = ("running" if (run_dir / CONFIG_FILE).is_file() else "starting"), ""
    elif "results" in info and _finished_after(run_dir, launch):
        status, error = "finished", ""
    else:
        error = error_line(run_dir)
        status = "aborted" if "stopped by SIGTERM" in error else "failed"
    eta = None
    if status == "running" and max_steps and steps:
        recent = [float(r["train/step_s"]) for r in steps[-20:] if "train/step_s" in r]
        eta = (max_steps - step) * (sum(recent) / len(recent)) if recent else None
    return RunState(run_dir, status, error, step, max_steps, eta)


def _finished_after(run_dir: Path, launch: dict[str, Any]) -> bool:
    """run.json's results belong to the latest launch (a resumed run's old results do not count)."""
    return not launch or (run_dir / RUN_FILE).stat().st_mtime >= float(launch.get("started", 0))


def summary(run_dir: Path) -> dict[str, Any]:
    """One row of the compare table."""
    cfg, info = run_config(run_dir), read_json(run_dir / RUN_FILE)
    results = info.get("results", {})
    objective = str(cfg.get("objective") or "eval/loss")
    peak = next((v for k, v in results.items() if k.startswith("memory/peak")), None)
    now = state(run_dir)
    return {"run": run_dir.name, "status": now.status, "model": model_name(run_dir, cfg),
            "adapter": (cfg.get("adapter") or {}).get("name", ""), "steps": info.get("steps", now.step),
            "metric": objective, "before": _round(before(run_dir, objective, results)),
            "after": _round(results.get(f"{objective}_after")),
            "trainable_parameters": info.get("trainable_parameters"),
            "seconds": _round(read_json(run_dir / STATUS_FILE).get("seconds"), 1),
            "peak_memory_MiB": _round(peak / 2**20 if peak else None, 1)}


def before(run_dir: Path, objective: str, results: dict[str, Any]) -> Any:
    """The held-out metric before training: run.json's, or (a resumed run has none) the step-0 evaluation."""
    if f"{objective}_before" in results:
        return results[f"{objective}_before"]
    return next((r[objective] for r in metrics(run_dir) if r.get("step") == 0 and objective in r), None)


def model_name(run_dir: Path, cfg: dict[str, Any]) -> str:
    """The base model's source, else its config choice as Hydra recorded it, else a random model's type."""
    model = cfg.get("model") or {}
    random_type = (model.get("random_init") or {}).get("model_type")
    return str(model.get("name_or_path") or _choice(run_dir, "model") or (f"random {random_type}" if random_type
                                                                          else ""))


def _choice(run_dir: Path, group: str) -> str:
    """The group's choice as Hydra recorded it (a random-init model has no name_or_path)."""
    try:
        choices = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return ""
    return str(choices.get(group, ""))


def _round(value: Any, digits: int = 4) -> Any:
    return round(float(value), digits) if isinstance(value, (int, float)) and math.isfinite(value) else value
