"""The task defaults, measured as a new user meets them: ``python train.py model=minilm_l6 data=bbc_news``
with nothing else on the command line (MiniLM-L6 + LoRA on BBC News, 5 topics, 10% held out; the
trainer's 120 steps of 8 examples), against the same command at the global learning rate the model
defaults replace (``optimizer.lr=2e-4``, every other group's YAML value).

Each row is one ``train.py`` process in a scratch folder (its run lands in ./adapters/ as a user's would;
wandb is disabled through the environment, not the command line). Writes
``benchmarks/results/task_defaults.{json,md}`` with the machine's load average.

    .venv/bin/python benchmarks/task_defaults.py [--rows defaults global_lr]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SCRATCH = RESULTS / "tmp" / "task_defaults"
COMMAND = ("model=minilm_l6", "data=bbc_news")
ROWS = {
    "defaults": ((), "nothing else: optimizer.lr from conf/model_defaults/minilm_l6.yaml (5e-3)"),
    "global_lr": (("optimizer.lr=2e-4",), "the global default rate (conf/optimizer/adamw.yaml)"),
}


def run_row(name: str) -> dict:
    extra, _ = ROWS[name]
    folder = SCRATCH / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *COMMAND, *extra], cwd=folder, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: train.py failed:\n{done.stderr[-3000:]}")
    return read_row(name, folder, time.perf_counter() - start)


def read_row(name: str, folder: Path, seconds: float) -> dict:
    """A finished row's figures, from the run folder train.py wrote under ``folder``."""
    extra, what = ROWS[name]
    (run_dir,) = (folder / "adapters").iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    config = (run_dir / "config.yaml").read_text()
    results = info["results"]
    return {"row": name, "what": what, "command": " ".join(["python train.py", *COMMAND, *extra]),
            "accuracy_before": results["eval/accuracy_before"], "accuracy": results["eval/accuracy_after"],
            "eval_loss": results["eval/loss_after"], "steps": info["steps"], "seconds": round(seconds, 1),
            "lr": next(line.split(":")[1].strip() for line in config.splitlines() if line.startswith("  lr:"))}


def markdown(result: dict) -> str:
    from petuner.report import markdown_table

    rows = [[r["command"], r["lr"], f"{r['accuracy_before']:.4f} → {r['accuracy']:.4f}", f"{r['eval_loss']:.4f}",
             str(r["steps"]), f"{r['seconds']:.0f}"] for r in result["rows"]]
    return (f"# Task defaults: MiniLM-L6 + LoRA on BBC News\n\nload average before/after: {result['loadavg']}\n\n"
            + markdown_table(["command", "optimizer.lr", "held-out accuracy (before → after)", "held-out loss", "steps",
                              "seconds"],
                             rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=["defaults", "global_lr"])
    args = parser.parse_args()
    before = Path("/proc/loadavg").read_text().split()[:3]
    rows = [run_row(name) for name in args.rows]
    result = {"rows": rows, "loadavg": [before, Path("/proc/loadavg").read_text().split()[:3]]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "task_defaults.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "task_defaults.md").write_text(markdown(result))
    print(markdown(result))
    shutil.rmtree(SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
