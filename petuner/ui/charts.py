"""The curves of runs, as long tables (step, value, series) that Gradio's line plots draw."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from petuner.ui.store import RunState, metrics

# panel → the metric names it draws (eval panels take every eval/* metric but the loss)
PANELS = {"loss": ("train/loss", "eval/loss"), "learning rate": ("train/lr",), "grad norm": ("train/grad_norm",),
          "tokens/s": ("train/tokens_per_s",)}
COLUMNS = ["step", "value", "series"]


def run_frames(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Panel → its points for one run; ``evaluations`` holds perplexity / accuracy (and per-source losses)."""
    rows: dict[str, list[tuple[int, float, str]]] = {name: [] for name in [*PANELS, "evaluations"]}
    for record in metrics(run_dir):
        for name, value in record.items():
            if name == "step" or not isinstance(value, (int, float)):
                continue
            panel = next((p for p, names in PANELS.items() if name in names), None)
            if panel is None and name.startswith("eval/"):
                panel = "evaluations"
            if panel is not None:
                rows[panel].append((int(record["step"]), float(value), name))
    return {panel: pd.DataFrame(points, columns=COLUMNS) for panel, points in rows.items()}


def overlay(run_dirs: list[Path], name: str) -> pd.DataFrame:
    """One metric of several runs on one plot: the series is the run's name."""
    points = [(int(r["step"]), float(r[name]), d.name) for d in run_dirs for r in metrics(d)
              if isinstance(r.get(name), (int, float))]
    return pd.DataFrame(points, columns=COLUMNS)


def progress_text(now: RunState, points: int) -> str:
    """``running · step 12 / 40 · 12 loss points · ETA 8 s`` (and the one-line error of a failed run)."""
    parts = [now.status, f"step {now.step}" + (f" / {now.max_steps}" if now.max_steps else ""),
             f"{points} loss points"]
    if now.eta_s is not None:
        parts.append(f"ETA {now.eta_s:.0f} s")
    text = " · ".join(parts)
    return f"{text}\n\n{now.error}" if now.error else text
