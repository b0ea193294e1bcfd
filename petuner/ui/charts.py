"""The curves of runs: long tables (step, value, series) drawn as matplotlib figures.

Figures, not Gradio's live line plots: redrawn every second while a run trains, those stacked their
axes in the browser (Gradio 6.31); a figure is rendered on the server and replaced whole.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from petuner.ui.store import RunState, metrics

# panel → the metric names it draws (eval panels take every eval/* metric but the loss)
PANELS = {"loss": ("train/loss", "eval/loss"), "learning rate": ("train/lr",), "grad norm": ("train/grad_norm",),
          "tokens/s": ("train/tokens_per_s",)}
COLUMNS = ["step", "value", "series"]
OVERLAID = ("train/loss", "eval/loss")  # the metrics the Compare tab draws run against run


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


def figure(frames: dict[str, pd.DataFrame], columns: int = 5) -> Figure:
    """One panel per table, a line per series (``Figure``, not pyplot: no global state, thread-safe)."""
    rows = -(-len(frames) // columns)
    fig = Figure(figsize=(3.2 * min(columns, len(frames)), 2.6 * rows))
    axes = fig.subplots(rows, min(columns, len(frames)), squeeze=False).ravel()
    for ax, (title, frame) in zip(axes, frames.items(), strict=False):
        for series, points in frame.groupby("series", sort=True):
            ax.plot(points["step"], points["value"], label=str(series), marker="." if len(points) < 12 else None)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if len(frame):
            ax.legend(fontsize=7)
    for ax in axes[len(frames):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def progress_text(now: RunState, points: int) -> str:
    """``running · step 12 / 40 · 12 loss points · ETA 8 s`` (and the one-line error of a failed run)."""
    parts = [now.status, f"step {now.step}" + (f" / {now.max_steps}" if now.max_steps else ""),
             f"{points} loss points"]
    if now.eta_s is not None:
        parts.append(f"ETA {now.eta_s:.0f} s")
    text = " · ".join(parts)
    return f"{text}\n\n{now.error}" if now.error else text
