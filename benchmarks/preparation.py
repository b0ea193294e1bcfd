"""How long each method's one-off preparation of a single matrix takes, against the matrix's size.

Before training, some methods transform every target weight: PiSSA's and SVFit's SVD, LoLDU's LU
(through each method's own layer constructor), QLoRA's NF4 quantization (bitsandbytes) and LQ-LoRA's
iterated randomized SVD + NF quantization (``lq_decompose``). The work is per matrix and runs on the
training device (``AdapterMethod.device``); this measures it on this machine's CPU for square fp32
matrices from 576² (SmolLM2-135M's hidden size) to 4096² (a 7B model's), so that a user can predict the
cost for their model: multiply by the number of target matrices. Methods are interleaved per size; each
figure is the median of ``--repeats`` runs. Writes benchmarks/results/preparation.{json,md}.

    flock /tmp/petuner-heavy.lock .venv/bin/python benchmarks/preparation.py [--sizes 576 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from petuner.adapters.loldu import LoLDULinear
from petuner.adapters.lora import LoRALinear
from petuner.adapters.qlora import nf4_linear
from petuner.adapters.svfit import SVFitLinear
from petuner.io import atomic_write_json, atomic_write_text
from petuner.quant.lq import lq_decompose

RESULTS = Path(__file__).resolve().parent / "results"
R = 16


def methods(iterations: int) -> dict[str, Callable[[nn.Linear], object]]:
    return {
        "pissa (SVD)": lambda lin: LoRALinear(lin, r=R, alpha=2 * R, init="pissa"),
        "svfit (SVD)": lambda lin: SVFitLinear(lin, r=R),
        "loldu (LU)": lambda lin: LoLDULinear(lin, r=R, alpha=R),
        "qlora (NF4, bitsandbytes)": nf4_linear,
        f"lq_lora ({iterations} iterations, 3-bit)": lambda lin: lq_decompose(lin.weight, R, 3, 64, iterations),
    }


def seconds(make: Callable[[nn.Linear], object], size: int, repeats: int) -> float:
    times = []
    for seed in range(repeats):
        linear = nn.Linear(size, size, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(size, size, generator=torch.Generator().manual_seed(seed)) / size ** 0.5)
            start = time.perf_counter()
            make(linear)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    table = methods(args.iterations)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rows: dict[str, dict[int, float]] = {name: {} for name in table}
    for make in table.values():  # warm-up: imports, kernel selection, codebooks
        seconds(make, 64, 1)
    for size in args.sizes:
        repeats = args.repeats if size < 4096 else 1
        for name, make in table.items():
            rows[name][size] = seconds(make, size, repeats)
            print(f"{size:5d}² {name:32s} {rows[name][size]:8.3f} s", flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    result = {"sizes": args.sizes, "seconds": rows, "rank": R, "threads": torch.get_num_threads(),
              "loadavg_before": load_before, "loadavg_after": load_after, "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "preparation.json", result)
    lines = [f"Seconds to prepare one n×n fp32 matrix on this CPU ({torch.get_num_threads()} threads, r={R}; "
             f"load average {' '.join(load_before)} before, {' '.join(load_after)} after). Median of "
             f"{args.repeats} (1 at 4096²). Growth: the exponent k of time ∝ n^k between the two largest sizes.",
             "", "| method | " + " | ".join(f"{n}²" for n in args.sizes) + " | k |",
             "|---|" + "---:|" * (len(args.sizes) + 1)]
    for name, times in rows.items():
        a, b = args.sizes[-2:]
        k = (torch.tensor(times[b] / times[a]).log() / torch.tensor(b / a).log()).item()
        lines.append(f"| {name} | " + " | ".join(f"{times[n]:.3f}" for n in args.sizes) + f" | {k:.2f} |")
    atomic_write_text(RESULTS / "preparation.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
