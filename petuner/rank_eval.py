"""``petuner eval-ranks RUN_DIR``: evaluate a rank-dynamic adapter (DyLoRA) at every rank 1..r.

Writes ``rank_eval.json``, ``rank_eval.md`` and ``rank_eval.png`` (metric against rank) into the run
folder (or ``out``). The held-out split is rebuilt from the run's own data config, so the numbers are
comparable with the run's evaluations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from petuner.adapters.capabilities import RankDynamic
from petuner.data import build_data
from petuner.errors import PetunerError
from petuner.extras import require
from petuner.io import atomic_file, atomic_write_json, atomic_write_text
from petuner.report import markdown_table
from petuner.run_folder import load
from petuner.train.device import resolve_device, resolve_precision
from petuner.train.loop import evaluate


def eval_ranks(run_dir: Path | str, out: Path | str | None = None) -> list[dict[str, Any]]:
    require("plots")
    run = load(run_dir)
    if not isinstance(run.method, RankDynamic):
        raise PetunerError(f"adapter={run.cfg.adapter.name} has a fixed rank; eval-ranks needs a rank-dynamic "
                           "adapter (dylora)")
    loss = (run.cfg.get("loss") or {}).get("name", "sft")
    if loss != "sft":
        raise PetunerError(f"eval-ranks scores each rank with the model's own loss; this run trained with loss={loss} "
                           "(score its pairs with petuner eval RUN data=...)")
    data = build_data(run.cfg.data, run.tokenizer, run.cfg.model.task)
    device = resolve_device(run.cfg.trainer.device)
    dtype = resolve_precision(run.cfg.trainer.precision, device)
    run.model.to(device)
    rows = []
    for rank in run.method.ranks():
        run.method.set_rank(run.model, rank)
        rows.append({"rank": rank, **evaluate(run.model, data, run.cfg.trainer.eval_batch_size, device, dtype)})
    write_rank_table(rows, Path(out) if out else Path(run_dir), title=f"{run.cfg.adapter.name} on {run.cfg.data.name}")
    return rows


def write_rank_table(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "rank_eval.json", rows)
    keys = [k for k in rows[0] if k != "rank"]
    table = markdown_table(["rank", *keys], [[r["rank"], *(f"{r[k]:.4f}" for k in keys)] for r in rows],
                           numeric=[True] * (len(keys) + 1))
    atomic_write_text(out / "rank_eval.md", table)
    metric = "eval/accuracy" if "eval/accuracy" in keys else "eval/loss"
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.plot([r["rank"] for r in rows], [r[metric] for r in rows], marker="o")
    ax.set(xlabel="rank", ylabel=metric, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(out / "rank_eval.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
