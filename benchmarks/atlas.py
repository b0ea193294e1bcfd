"""aTLAS helps: two runs trained on two different tasks, their plain average, and aTLAS over both trained briefly
on a small mixed set, all scored on the mixed held-out set (and on each task's own held-out split).

Tasks: chatterbot conversations (``data=chatterbot``, sft) and BBC News text (``data=bbc_text``, language
modelling); the mixed set is ``data=mixture`` (both, as shipped: chatterbot weighted 3, BBC 1), whose held-out
split nobody trains on (the single runs never see the mixture's split; rows of theirs may sit in it, which only
favours them). The plain average is ``petuner merge A B --method task_arithmetic --weights 0.5 0.5``. Writes
benchmarks/results/atlas.{json,md}.

    .venv/bin/python benchmarks/atlas.py --work /tmp/atlas [--steps 30] [--atlas-steps 15] [model=...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from petuner.config import compose_config
from petuner.evaluate import evaluate_run
from petuner.merge import merge_runs
from petuner.run import run

RESULTS = Path(__file__).resolve().parent / "results"
COMMON = ["logger=none", "data.max_length=64", "trainer.batch_size=4", "trainer.eval_batch_size=16",
          "trainer.save_every=100000", "optimizer.warmup_steps=0"]
MIXED = ["data=mixture", "data.limit=400", "data.eval_size=48", "data.max_length=64"]
TASKS = {"chatterbot": ["data=chatterbot", "data.limit=400", "data.eval_size=32", "data.max_length=64"],
         "bbc_text": ["data=bbc_text", "data.limit=400", "data.eval_size=32", "data.max_length=64"]}


def train(run_dir: Path, overrides: list[str]) -> float:
    """Train one run unless its folder is complete; returns seconds spent."""
    if (run_dir / "adapter.safetensors").is_file():
        return 0.0
    start = time.perf_counter()
    run(compose_config([*overrides, f"run_dir={run_dir}"]))
    return time.perf_counter() - start


def score(run_dir: Path) -> dict[str, float]:
    """Held-out loss on the mixed set and on each task's own split."""
    scores = {"mixed": evaluate_run(run_dir, MIXED)[1]["eval/loss"]}
    for task, overrides in TASKS.items():
        scores[task] = evaluate_run(run_dir, overrides)[1]["eval/loss"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the runs (reused when complete)")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each single-task run")
    parser.add_argument("--atlas-steps", type=int, default=15, help="aTLAS training steps on the mixed set")
    parser.add_argument("overrides", nargs="*", help="e.g. model=smollm2_135m (the default)")
    args = parser.parse_args()
    work = Path(args.work)
    seconds = {}
    base = [*COMMON, *args.overrides]
    a, b = work / "chatterbot", work / "bbc_text"
    seconds["chatterbot"] = train(a, [*base, *TASKS["chatterbot"], f"trainer.max_steps={args.steps}",
                                      "optimizer.lr=1e-3"])
    seconds["bbc_text"] = train(b, [*base, *TASKS["bbc_text"], f"trainer.max_steps={args.steps}", "optimizer.lr=1e-3"])
    average = work / "average"
    if not (average / "adapter.safetensors").is_file():
        merge_runs([a, b], average, method="task_arithmetic", weights=[0.5, 0.5], force=True)
    atlas = work / "atlas"
    seconds["atlas"] = train(atlas, [*base, *MIXED, "adapter=atlas", f"adapter.sources=[{a},{b}]",
                                     f"trainer.max_steps={args.atlas_steps}", "optimizer.lr=5e-2"])
    rows = []
    for name, folder in (("chatterbot run", a), ("bbc_text run", b), ("plain average (merge)", average),
                         ("aTLAS (mixed set)", atlas)):
        info = json.loads((folder / "run.json").read_text())
        rows.append({"model": name, "trainable_parameters": info["trainable_parameters"], **score(folder)})
    load = Path("/proc/loadavg").read_text().split()[:3]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "atlas.json").write_text(json.dumps({"args": vars(args), "loadavg": load, "train_seconds": seconds,
                                                    "rows": rows}, indent=2))
    lines = [f"# aTLAS over two single-task runs ({' '.join(args.overrides) or 'model=smollm2_135m'}; "
             f"{args.steps} steps each, aTLAS {args.atlas_steps} steps; load {' '.join(load)})", "",
             "| model | trainable parameters | mixed held-out loss | chatterbot held-out | bbc_text held-out |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['trainable_parameters']:,} | {r['mixed']:.4f} | {r['chatterbot']:.4f} | "
              f"{r['bbc_text']:.4f} |" for r in rows]
    (RESULTS / "atlas.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
