"""Data parallel throughput: the same global batches trained by 1 process and by N processes (torchrun).

On CPU the machine's cores are split: 1 process × T threads against N processes × T/N threads each
(OMP_NUM_THREADS), so the comparison is of the parallel strategy, not of more hardware. On GPUs
(``--device cuda``) each process gets one GPU: 1 GPU against N GPUs. Configurations run interleaved,
``--repeats`` times; each run's figure is the median over its steps after ``--warmup`` of the global
tokens/s that ``train.py`` logs (all ranks' tokens over the step's wall time). Ratios are per repeat
against the first configuration. Writes benchmarks/results/distributed_<device>.{json,md}.

    .venv/bin/python benchmarks/distributed.py                      # CPU: 1×2 threads vs 2×1 thread
    .venv/bin/python benchmarks/distributed.py --device cuda --procs 1 8 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def command(procs: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
              if procs > 1 else [sys.executable])
    return [*launch, str(ROOT / "train.py"), f"model={args.model}", f"data={args.data}", "logger=none",
            f"data.max_length={args.max_length}", f"trainer.batch_size={args.batch_size}",
            f"trainer.max_steps={args.steps}", f"trainer.device={args.device}",
            f"trainer.precision={args.precision}", "trainer.save_every=null", "data.eval_size=16",
            "adapter.dropout=0", f"run_dir={run_dir}", *args.overrides]


def tokens_per_s(run_dir: Path, warmup: int) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [m["train/tokens_per_s"] for m in lines if "train/tokens_per_s" in m and m["step"] > warmup]
    return statistics.median(rates)


def measure(procs: int, threads: int, args: argparse.Namespace, scratch: Path, tag: str) -> float:
    run_dir = scratch / f"p{procs}-{tag}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command(procs, run_dir, args), env=env, cwd=scratch, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    return tokens_per_s(run_dir, args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads shared by the processes")
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--data", default="chatterbot")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=8, help="global examples per step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = parser.parse_args()
    figures: dict[int, list[float]] = {p: [] for p in args.procs}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for procs in args.procs:
                threads = max(1, args.threads // procs) if args.device == "cpu" else 1
                figures[procs].append(measure(procs, threads, args, Path(tmp), f"r{repeat}"))
                loads.append(Path("/proc/loadavg").read_text().split()[0])
                print(f"repeat {repeat}: {procs} process(es): {figures[procs][-1]:.0f} tokens/s", flush=True)
    base = args.procs[0]
    rows = [{"processes": p, "threads_per_process": max(1, args.threads // p) if args.device == "cpu" else None,
             "tokens_per_s": statistics.median(v), "runs": v,
             "ratio_per_repeat": [x / b for x, b in zip(v, figures[base], strict=True)]} for p, v in figures.items()]
    report = {"device": args.device, "args": vars(args), "loadavg_after_each_run": loads, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"distributed_{args.device.split(':')[0]}"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{args.model}, {args.data}, global batch {args.batch_size} × {args.max_length} tokens, "
             f"{args.precision}, {args.device}; {args.repeats} interleaved repeats; load average after each "
             f"run: {', '.join(loads)}", "",
             "| processes | threads each | tokens/s (median) | vs first, per repeat |", "|---:|---:|---:|---|"]
    lines += [f"| {r['processes']} | {r['threads_per_process'] or '-'} | {r['tokens_per_s']:.0f} | "
              f"{', '.join(f'{x:.2f}' for x in r['ratio_per_repeat'])} |" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
