"""Every adapter and optimizer on the same two real tasks, with the same step budget.

Tasks: MiniLM-L6 (all-MiniLM-L6-v2) on BBC News topic accuracy (5 classes, held-out 10%), and
SmolLM2-135M-Instruct on chatterbot held-out loss (answer tokens only). Each row is one
``python train.py`` run in its own process (peak RSS is a process-lifetime maximum), with the same
data, seed, batch and steps; only the adapter, the optimizer and the learning rate differ.
Learning rates start at each method's usual order of magnitude (LoRA-type adapters one rate; methods
with a few hundred parameters, VeRA and SGD higher; full fine-tuning lower); ``--lr-factors`` also
tries multiples of a row's rate, and each cell reports the best rate tried for it (listed in the JSON).

Columns: the task metric after training, trainable parameters, optimizer state (exact bytes),
median step time (over every rate tried) as a ratio to LoRA + AdamW's on the same task and
machine, and peak RSS.
Finished rows are cached under ``benchmarks/results/tmp/methods/`` so an interrupted run continues
(``--fresh`` recomputes); writes ``benchmarks/results/methods.{json,md,png}``.

    .venv/bin/python benchmarks/methods.py [--tasks minilm_bbc smollm2_chat] [--rows lora dora ...]
        [--lr-factors 1 3 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SCRATCH = RESULTS / "tmp" / "methods"
MIB = 2 ** 20


@dataclass(frozen=True)
class Task:
    title: str
    metric: str            # key of run.json's results, read after training
    higher_is_better: bool
    steps: int
    overrides: tuple[str, ...]


TASKS = {
    "minilm_bbc": Task("MiniLM-L6 on BBC News", "eval/accuracy", True, 25,
                       ("model=minilm_l6", "data=bbc_news", "data.max_length=128", "trainer.batch_size=16",
                        "trainer.eval_batch_size=32")),
    "smollm2_chat": Task("SmolLM2-135M on chatterbot", "eval/loss", False, 20,
                         ("model=smollm2_135m", "data=chatterbot", "data.eval_size=64", "trainer.batch_size=8",
                          "trainer.eval_batch_size=16")),
}
COMMON = ("logger=none", "trainer.save_every=null", "trainer.keep_checkpoints=1", "optimizer.warmup_steps=3",
          "trainer.seed=0")


@dataclass(frozen=True)
class Row:
    name: str
    group: str                  # adapter | optimizer
    overrides: tuple[str, ...]
    lr: dict[str, float]        # per task


LORA_LR = {"minilm_bbc": 5e-3, "smollm2_chat": 1e-3}
HIGH_LR = {"minilm_bbc": 2e-2, "smollm2_chat": 5e-3}
FULL_LR = {"minilm_bbc": 1e-4, "smollm2_chat": 5e-5}
GALORE_LR = {k: 4 * v for k, v in FULL_LR.items()}  # GaLore's scale 0.25 times 4×: full fine-tuning's step
SORA = ("adapter=sora", "adapter.gate_init=randn", "adapter.xi_schedule=linear", "adapter.xi=0.1",
        "adapter.xi_final=0.4", "adapter.gate_lr=0.05")
ROWS = [
    Row("lora", "adapter", ("adapter=lora",), LORA_LR),
    Row("dora", "adapter", ("adapter=lora", "adapter.variant=dora"), LORA_LR),
    Row("pissa", "adapter", ("adapter=lora", "adapter.init=pissa"), LORA_LR),
    Row("rslora", "adapter", ("adapter=lora", "adapter.scaling=rslora"), LORA_LR),
    Row("block_lora", "adapter", ("adapter=block_lora",), LORA_LR),
    Row("dylora", "adapter", ("adapter=dylora",), LORA_LR),
    Row("sora", "adapter", SORA, LORA_LR),
    Row("qlora", "adapter", ("adapter=qlora",), LORA_LR),
    Row("lq_lora", "adapter", ("adapter=lq_lora",), LORA_LR),
    Row("adalora", "adapter", ("adapter=adalora",), LORA_LR),
    Row("loha", "adapter", ("adapter=loha",), LORA_LR),
    Row("vera", "adapter", ("adapter=vera",), HIGH_LR),
    Row("loldu", "adapter", ("adapter=loldu",), HIGH_LR),
    Row("svfit", "adapter", ("adapter=svfit",), HIGH_LR),
    Row("full", "adapter", ("adapter=none",), FULL_LR),
    Row("lora+sgd", "optimizer", ("adapter=lora", "optimizer=sgd"), HIGH_LR),
    Row("lora+adamw8bit", "optimizer", ("adapter=lora", "optimizer=adamw8bit"), LORA_LR),
    Row("lora+paged_adamw8bit", "optimizer", ("adapter=lora", "optimizer=paged_adamw8bit"), LORA_LR),
    Row("full+adamw8bit", "optimizer", ("adapter=none", "optimizer=adamw8bit"), FULL_LR),
    Row("full+galore", "optimizer", ("adapter=none", "optimizer=galore"), GALORE_LR),
    Row("full+galore8bit", "optimizer", ("adapter=none", "optimizer=galore8bit"), GALORE_LR),
]
BASELINE = "lora"  # step-time ratios are against this row of the same task


def command(task: str, row: Row, run_dir: Path, steps: int, lr: float) -> list[str]:
    """The exact ``train.py`` command line of one cell."""
    return [sys.executable, str(ROOT / "train.py"), *TASKS[task].overrides, *row.overrides, *COMMON,
            f"optimizer.lr={lr:g}", f"trainer.max_steps={steps}", f"run_dir={run_dir}",
            f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


def measure(task: str, row: Row, steps: int, lr: float) -> dict:
    """Train one cell in a fresh process and read back what its run folder recorded."""
    run_dir = SCRATCH / "runs" / f"{task}__{row.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    cmd = command(task, row, run_dir, steps, lr)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "seconds": seconds, "lr": lr}
    info = json.loads((run_dir / "run.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = [m["train/step_s"] for m in lines if "train/step_s" in m]
    results = info["results"]
    cell = {"metric": results[TASKS[task].metric + "_after"], "metric_before": results[TASKS[task].metric + "_before"],
            "trainable_parameters": info["trainable_parameters"], "total_parameters": info["total_parameters"],
            "optimizer_state_bytes": results["memory/optimizer_state_bytes"],
            "grad_bytes": results["memory/grad_bytes"], "param_bytes": results["memory/param_bytes"],
            "peak_bytes": results.get("memory/peak_bytes", results.get("memory/peak_rss_bytes")),
            "median_step_s": statistics.median(step_s[1:] or step_s), "seconds": seconds, "load_avg_before": load,
            "lr": lr, "device": info["device"], "command": " ".join(["python train.py", *cmd[2:-3]])}
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of full fine-tuning are large
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS], default=[r.name for r in ROWS])
    parser.add_argument("--steps", type=int, help="override every task's step budget (a quick smoke run)")
    parser.add_argument("--lr-factors", nargs="+", type=float, default=[1.0],
                        help="train the selected rows at these multiples of their rate too; each cell shows "
                             "the best of every rate tried for it (cached)")
    parser.add_argument("--fresh", action="store_true", help="recompute cached cells")
    parser.add_argument("--render", action="store_true", help="rewrite methods.md from methods.json (no runs)")
    args = parser.parse_args()
    if args.render:
        (RESULTS / "methods.md").write_text(markdown(json.loads((RESULTS / "methods.json").read_text())))
        return

    cells: dict[str, dict[str, dict]] = {task: {} for task in TASKS}
    for task in args.tasks:
        steps = args.steps or TASKS[task].steps
        for row in (r for r in ROWS if r.name in args.rows):
            for factor in args.lr_factors:
                lr = float(f"{row.lr[task] * factor:.3g}")
                cache = SCRATCH / f"{task}__{row.name}__{steps}__lr{lr:g}.json"
                if cache.exists() and not args.fresh:
                    continue
                cell = measure(task, row, steps, lr)
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(cell, indent=2) + "\n")
                print(f"{task:13s} {row.name:22s} lr={lr:<8g} " + (f"error: {cell['error']}" if "error" in cell else
                      f"{TASKS[task].metric}={cell['metric']:.4f} step={cell['median_step_s']:.2f}s "
                      f"({cell['seconds']:.0f}s, load {cell['load_avg_before']:.1f})"), flush=True)
            tried = [json.loads(p.read_text()) for p in SCRATCH.glob(f"{task}__{row.name}__{steps}__lr*.json")]
            cells[task][row.name] = best(tried, TASKS[task])
    for by_row in cells.values():
        base = by_row.get(BASELINE, {}).get("median_step_s")
        for cell in by_row.values():
            if base and "median_step_s" in cell:
                cell["step_time_vs_lora"] = cell["median_step_s"] / base

    result = {"tasks": {k: {"title": t.title, "metric": t.metric, "steps": args.steps or t.steps,
                            "overrides": list(t.overrides)} for k, t in TASKS.items() if k in args.tasks},
              "common_overrides": list(COMMON), "rows": [{"name": r.name, "group": r.group,
                                                          "overrides": list(r.overrides), "lr": r.lr} for r in ROWS],
              "cells": {k: v for k, v in cells.items() if v}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "methods.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (RESULTS / "methods.md").write_text(table)
    plot(result)
    print(table)


def best(tried: list[dict], task: Task) -> dict:
    """The cell of the best rate among those tried (errors last), with every rate's metric attached and
    the step time of all of them (a median: one run's timing is at the mercy of the machine's load)."""
    def score(cell: dict) -> float:
        if "error" in cell or cell["metric"] != cell["metric"]:  # failed, or NaN
            return float("-inf")
        return cell["metric"] if task.higher_is_better else -cell["metric"]

    chosen = dict(max(tried, key=score))
    chosen["lr_tried"] = {f"{c['lr']:g}": c.get("metric") for c in sorted(tried, key=lambda c: c["lr"])}
    if steps := [c["median_step_s"] for c in tried if "median_step_s" in c]:
        chosen["median_step_s"] = statistics.median(steps)  # the rate does not change a step's work
    return chosen


def _fmt_bytes(n: float) -> str:
    return f"{n / MIB:,.1f} MiB" if n >= MIB else f"{n / 1024:,.1f} KiB"


def markdown(result: dict) -> str:
    from petuner.report import markdown_table

    tasks = list(result["cells"])
    headers = ["method", "group"]
    for t in tasks:
        headers += [f"{result['tasks'][t]['title']}: {result['tasks'][t]['metric'].split('/')[1]} (before → after)",
                    "trainable", "optimizer state", "step time vs LoRA", "peak memory"]
    table = []
    for row in result["rows"]:
        if not any(row["name"] in result["cells"][t] for t in tasks):
            continue
        cols = [f"`{row['name']}`", row["group"]]
        for t in tasks:
            cell = result["cells"][t].get(row["name"])
            if cell is None:
                cols += ["—"] * 5
            elif "error" in cell:
                cols += [f"error: {cell['error']}"] + ["—"] * 4
            else:
                ratio = cell.get("step_time_vs_lora", float("nan"))
                tried = len(cell["lr_tried"])
                at = f" @ {cell['lr']:g}" + (f" (best of {tried} rates)" if tried > 1 else "")
                cols += [f"{cell['metric_before']:.3f} → **{cell['metric']:.3f}**{at}",
                         f"{cell['trainable_parameters']:,}", _fmt_bytes(cell["optimizer_state_bytes"]),
                         f"{ratio:.2f}×", f"{cell['peak_bytes'] / 2 ** 30:.2f} GiB"]
        table.append(cols)
    lines = markdown_table(headers, table, numeric=[False, False] + [True] * 5 * len(tasks)).splitlines()
    notes = []
    for t in tasks:
        info = result["tasks"][t]
        base = result["cells"][t].get(BASELINE, {})
        device = base.get("device", "?")
        loads = [c["load_avg_before"] for c in result["cells"][t].values() if "load_avg_before" in c]
        notes.append(f"- {info['title']}: {info['steps']} steps, `{' '.join(info['overrides'])}` "
                     f"(device {device}; LoRA's median step {base.get('median_step_s', float('nan')):.2f} s; "
                     f"load average before each row {min(loads):.1f}–{max(loads):.1f}).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes + prose_figures(result)) + "\n"


def prose_figures(result: dict) -> list[str]:
    """The figures prose about this table quotes, computed from it (hand-copied ones drifted: #30)."""
    adapters = {r["name"] for r in result["rows"] if r["group"] == "adapter"} - {BASELINE, "full"}
    ratios = {(t, n): c["step_time_vs_lora"] for t, cells in result["cells"].items() for n, c in cells.items()
              if n in adapters and "step_time_vs_lora" in c}
    if not ratios:
        return []
    low, high = min(ratios.values()), max(ratios.values())

    def named(value: float) -> str:
        return ", ".join(sorted({n for (_, n), r in ratios.items() if r == value}))

    lines = [f"- Adapters' step time against LoRA (LoRA and full fine-tuning aside): {low:.2f}× ({named(low)}) "
             f"to {high:.2f}× ({named(high)})."]
    for t, cells in result["cells"].items():
        ok = {n: c for n, c in cells.items() if "trainable_parameters" in c}
        fewest = min(c["trainable_parameters"] for c in ok.values())
        rows = "; ".join(f"{n} {c['metric']:.3f} ({c['step_time_vs_lora']:.2f}× LoRA's step)"
                         for n, c in sorted(ok.items()) if c["trainable_parameters"] == fewest)
        lines.append(f"- {result['tasks'][t]['title']}, fewest trainable parameters ({fewest:,}): {rows}.")
    return lines


def plot(result: dict) -> None:
    """One horizontal bar per row and task (same row order), coloured by group, with trainable parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["cells"])
    rows = [r for r in result["rows"] if any(r["name"] in result["cells"][t] for t in tasks)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 0.32 * len(rows) + 1.4), squeeze=False)
    colours = {"adapter": "tab:blue", "optimizer": "tab:orange"}
    for ax, task in zip(axes[0], tasks, strict=True):
        info, cells = result["tasks"][task], result["cells"][task]
        shown = [(i, r, cells[r["name"]]) for i, r in enumerate(rows)
                 if r["name"] in cells and "error" not in cells[r["name"]]]
        ax.barh([i for i, _, _ in shown], [c["metric"] for _, _, c in shown],
                color=[colours[r["group"]] for _, r, _ in shown])
        for i, _, c in shown:
            ax.annotate(f" {c['metric']:.3f}  ({c['trainable_parameters']:,} trained)", (c["metric"], i),
                        va="center", fontsize=7)
        if (base := cells.get(BASELINE)) is not None:
            ax.axvline(base["metric"], color="grey", linestyle=":", linewidth=1)
        ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        best = "higher" if TASKS[task].higher_is_better else "lower"
        ax.set(xlabel=f"held-out {info['metric'].split('/')[1]} ({best} is better)",
               title=f"{info['title']}, {info['steps']} steps")
        ax.set_xlim(0, max(c["metric"] for _, _, c in shown) * 1.45)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, ["adapter (AdamW)", "optimizer variant"], fontsize=8, loc="lower center", ncol=2)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(RESULTS / "methods.png", dpi=120)


if __name__ == "__main__":
    main()
