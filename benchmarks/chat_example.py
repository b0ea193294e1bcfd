"""The chat example, measured as a user runs it: chatterbot's whole conversations as OpenAI ``messages``
(``benchmarks/chatterbot_chats.py``) through ``python train.py data=chat`` on SmolLM2-135M-Instruct with LoRA.

One ``train.py`` process in a scratch folder (wandb disabled through the environment, not the command line);
its run.json gives the held-out loss before and after, the data report and memory; the wall time and the
machine's load average (before and after) are recorded beside it, since the CPU may be shared.
Writes ``benchmarks/results/chat_example.{json,md}``.

    .venv/bin/python benchmarks/chat_example.py [--steps 80]
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
sys.path.insert(0, str(ROOT))

from benchmarks.chatterbot_chats import conversations  # noqa: E402
from petuner.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SCRATCH = RESULTS / "tmp" / "chat_example"
DATA_FILE = "chatterbot_chats.jsonl"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def command(steps: int) -> list[str]:
    return [f"data.path={DATA_FILE}", "data.eval_size=64", "logger=none", f"trainer.max_steps={steps}",
            "trainer.batch_size=8", "trainer.eval_batch_size=16"]


def measure(steps: int) -> dict:
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    rows = conversations()
    (SCRATCH / DATA_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    args = ["data=chat", *command(steps), f"run_dir={SCRATCH / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    before, start = loadavg(), time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=SCRATCH, env=env,
                          capture_output=True, text=True)
    wall, after = time.perf_counter() - start, loadavg()
    if done.returncode != 0:
        raise SystemExit(f"train.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    info = json.loads((SCRATCH / "run" / "run.json").read_text())
    multi = sum(len(r["messages"]) > 2 for r in rows)
    return {"command": " ".join(["python train.py data=chat", *command(steps)]),
            "data_file": f"benchmarks/chatterbot_chats.py ({len(rows):,} conversations, {multi} multi-turn)",
            "conversations": len(rows), "multi_turn": multi,
            "model": info["base_model"], "device": info["device"], "compute_dtype": info["compute_dtype"],
            "trainable_parameters": info["trainable_parameters"], "steps": info["steps"],
            "train_examples": info["train_examples"], "eval_examples": info["eval_examples"], "data": info["data"],
            "results": info["results"], "wall_s": round(wall, 1), "loadavg_before": before, "loadavg_after": after}


def markdown(r: dict) -> str:
    res, held_out = r["results"], r["data"]["sources"]["chat"]["eval"]
    minutes, seconds = divmod(round(r["wall_s"]), 60)
    load = f"load average {r['loadavg_before'].split()[0]} before, {r['loadavg_after'].split()[0]} after"
    return (f"SmolLM2-135M-Instruct, LoRA on q/v ({r['trainable_parameters']:,} trainable), on chatterbot's "
            f"conversations as OpenAI messages\n(`benchmarks/chatterbot_chats.py`: {r['conversations']:,} "
            f"conversations, {r['multi_turn']} multi-turn); {r['eval_examples']} held out; {r['steps']} steps of 8; "
            f"{r['device'].upper()} {r['compute_dtype']}.\n\n"
            f"Command: `{r['command']}`\n\n| | |\n|---|---|\n"
            f"| held-out loss before → after ({held_out['examples']} conversations, {held_out['loss_tokens']} reply "
            f"tokens) | {res['eval/loss_before']:.3f} → {res['eval/loss_after']:.3f} (perplexity "
            f"{res['eval/perplexity_before']:.1f} → {res['eval/perplexity_after']:.1f}) |\n"
            f"| wall time | {minutes} min {seconds} s (2-core CPU shared with other work; {load}) |\n"
            f"| peak memory (process RSS) | {res['memory/peak_rss_bytes'] / 1e9:.1f} GB |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    result = measure(args.steps)
    atomic_write_json(RESULTS / "chat_example.json", result)
    atomic_write_text(RESULTS / "chat_example.md", markdown(result))
    print(markdown(result))
    shutil.rmtree(SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
