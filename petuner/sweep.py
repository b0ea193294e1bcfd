"""Sweeps: each Hydra job's outcome, and the report over a sweep folder.

Hydra does the sweeping (``python train.py -m``): grids with the basic sweeper, searches with
hydra-optuna-sweeper, parallel jobs with the joblib launcher, clusters with submitit (SLURM) or Ray —
petuner changes nothing between them. What petuner adds: a failing job records ``status.json``
(status, error, seconds) and returns NaN instead of stopping the sweep; a finished job returns its
objective (``objective``, e.g. ``eval/loss``, after training) for search sweepers; wandb runs of one
sweep share a group; and ``petuner sweep-report SWEEP_DIR`` tabulates every job (markdown, CSV, plots).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, open_dict

from petuner.choices import DIRECTIONS
from petuner.errors import PetunerError
from petuner.extras import require
from petuner.io import atomic_file, atomic_write_json, atomic_write_text
from petuner.report import markdown_table

log = logging.getLogger(__name__)
STATUS_FILE = "status.json"


def run_job(cfg: DictConfig, sweep_dir: str | None = None) -> float:
    """Train one run; inside a sweep (``sweep_dir`` set) a failure is recorded, not raised.

    Returns the run's objective after training (NaN for a failed job: search sweepers skip it).
    """
    from petuner.run import run

    if sweep_dir is not None and "wandb" in cfg.logger and cfg.logger.wandb.get("group") is None:
        with open_dict(cfg):
            cfg.logger.wandb.group = Path(sweep_dir).name
    run_dir = Path(cfg.run_dir)
    start = time.perf_counter()
    try:
        info = run(cfg)
    except Exception as err:
        _record(run_dir, {"status": "failed", "error": _one_line(err), "seconds": time.perf_counter() - start})
        if sweep_dir is None:
            raise
        log.error("job %s failed: %s", run_dir, _one_line(err))
        log.debug("%s", traceback.format_exc())
        return math.nan
    _record(run_dir, {"status": "ok", "seconds": time.perf_counter() - start})
    return float(info["results"].get(f"{cfg.objective}_after", math.nan))


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _record(run_dir: Path, status: dict[str, Any]) -> None:
    from petuner.train.distributed import is_writer

    if not is_writer():  # under torchrun: rank 0's record
        return
    with contextlib.suppress(OSError):  # an unwritable run_dir is itself the error being reported
        atomic_write_json(run_dir / STATUS_FILE, status)


# --- the report -------------------------------------------------------------------------------------

def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder: overrides, status, final metrics, parameters, memory, time."""
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
                      key=lambda p: (len(p.name), p.name)):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        status = json.loads((job / STATUS_FILE).read_text()) if (job / STATUS_FILE).is_file() else \
            {"status": "unfinished", "error": "no status.json: killed or still running"}
        info = json.loads((job / "run.json").read_text()) if (job / "run.json").is_file() else {}
        row: dict[str, Any] = {"job": job.name, "overrides": dict(o.split("=", 1) for o in overrides if "=" in o),
                               "status": status["status"], "error": status.get("error", ""),
                               "seconds": status.get("seconds"),
                               "trainable_parameters": info.get("trainable_parameters")}
        results = info.get("results", {})
        row.update({k: v for k, v in results.items() if k.endswith("_after") or k.startswith("memory/")})
        rows.append(row)
    if not rows:
        raise PetunerError(f"{sweep_dir} holds no sweep jobs (no */.hydra/overrides.yaml): is it a -m sweep folder?")
    return rows


def best_job(rows: list[dict[str, Any]], objective: str) -> dict[str, Any] | None:
    key = f"{objective}_after"
    done = [r for r in rows if r["status"] == "ok" and isinstance(r.get(key), (int, float))]
    if not done:
        return None
    pick = min if DIRECTIONS.get(objective, "minimize") == "minimize" else max
    return pick(done, key=lambda r: r[key])


def sweep_report(sweep_dir: Path | str, objective: str | None = None, out: Path | str | None = None) -> Path:
    """Write sweep_report.{md,csv} and one PNG per swept key into ``out`` (default: the sweep folder)."""
    require("plots")
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise PetunerError(f"{sweep_dir} is not a folder")
    rows = collect(sweep_dir)
    objective = objective or ("eval/accuracy" if any("eval/accuracy_after" in r for r in rows) else "eval/loss")
    out = Path(out) if out else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r["overrides"]})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]
    fixed = {k: rows[0]["overrides"].get(k) for k in keys if k not in swept}
    metrics = sorted({k for r in rows for k in r if k.endswith("_after") or k.startswith("memory/")})
    columns = ["job", *swept, "status", *metrics, "trainable_parameters", "seconds", "error"]
    best = best_job(rows, objective)
    flat = [{**{c: r.get(c, "") for c in columns if c not in swept}, **{k: r["overrides"].get(k, "") for k in swept}}
            for r in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_text(out / "sweep_report.csv", buffer.getvalue())

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = [f"# Sweep {sweep_dir.name}: {len(rows)} jobs, objective {objective} "
             f"({DIRECTIONS.get(objective, 'minimize')})", "",
             "Fixed: " + (", ".join(f"`{k}={v}`" for k, v in fixed.items()) or "nothing"), ""]
    cells = [[cell(row[c]) for c in columns] for row in flat]
    cells = [[f"**{c}**" if c and r is best else c for c in line] for line, r in zip(cells, rows, strict=True)]
    lines.append(markdown_table(columns, cells, numeric=[False] * len(columns)).rstrip("\n"))
    if best is not None:
        chosen = ", ".join(f"{k}={best['overrides'][k]}" for k in swept)
        lines += ["", f"Best: job {best['job']} ({chosen}), "
                      f"{objective} = {best[f'{objective}_after']:.4g}."]
    atomic_write_text(out / "sweep_report.md", "\n".join(lines) + "\n")
    _plots(rows, swept, objective, out)
    return out / "sweep_report.md"


def _plots(rows: list[dict[str, Any]], swept: list[str], objective: str, out: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    key = f"{objective}_after"
    done = [r for r in rows if r["status"] == "ok" and key in r]
    for name in swept:
        values = [r["overrides"].get(name, "") for r in done]
        labels = sorted(set(values), key=_sort_key)
        fig = Figure(figsize=(4.8, 3.2))
        ax = fig.subplots()
        ax.scatter([labels.index(v) for v in values], [r[key] for r in done])
        ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=name, ylabel=objective, title=f"{objective} against {name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_file(out / f"sweep_{name.replace('/', '_').replace('.', '_')}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)


def _sort_key(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)
