"""Building the chatterbot data (conf/data/chatterbot.yaml, SmolLM2's tokenizer) the first time vs from the cache.

Each round builds into an empty cache folder (reading the YAML files, rendering and tokenizing every
conversation, writing the cache) and then builds again from it (reading the YAML files, loading the
tokenized splits); rounds interleave the two so that machine load hits both alike. Also, if given,
the chat example's multi-turn file (benchmarks/chatterbot_chats.py). Writes
benchmarks/results/data_cache.{json,md}.

    PYTHONPATH=. .venv/bin/python benchmarks/data_cache.py [chatterbot_chats.jsonl]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from petuner.config import compose_config
from petuner.data import build_data
from petuner.models import load_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
ROUNDS = 5


def timed_build(cfg, tokenizer) -> tuple[float, int]:
    start = time.perf_counter()
    data = build_data(cfg.data, tokenizer, cfg.model.task)
    return time.perf_counter() - start, len(data.train) + len(data.eval)


def measure(overrides: list[str]) -> dict:
    cfg = compose_config(["run_dir=unused", *overrides])
    tokenizer = load_tokenizer(cfg.model)
    first, cached = [], []
    for _ in range(ROUNDS):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["PETUNER_DATA_CACHE"] = cache
            seconds, examples = timed_build(cfg, tokenizer)
            first.append(seconds)
            cached.append(timed_build(cfg, tokenizer)[0])
    return {"overrides": overrides, "examples": examples, "first_s": first, "cached_s": cached,
            "first_median_s": statistics.median(first), "cached_median_s": statistics.median(cached),
            "speedup": statistics.median(first) / statistics.median(cached)}


def main() -> None:
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rows = {"chatterbot (Q/A pairs)": measure(["data=chatterbot"])}
    if len(sys.argv) > 1:
        chats = ["data=chat", f"data.path={sys.argv[1]}"]
        rows["chatterbot conversations (messages JSONL, data=chat)"] = measure(chats)
    out = {"tokenizer": "SmolLM2-135M-Instruct", "rounds": ROUNDS, "loadavg_before": load_before,
           "loadavg_after": Path("/proc/loadavg").read_text().split()[:3], "rows": rows,
           "config": OmegaConf.to_container(compose_config(["run_dir=unused"]).data)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_cache.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"Building the data, {ROUNDS} interleaved rounds, median seconds (load average before "
             f"{' '.join(load_before)}, after {' '.join(out['loadavg_after'])}).", "",
             "| data | examples | first build (s) | from cache (s) | first / cached |", "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['examples']:,} | {row['first_median_s']:.2f} | {row['cached_median_s']:.2f} "
                     f"| {row['speedup']:.1f}x |")
    (RESULTS / "data_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
