"""The ``--case`` comparisons of ``vs_peft.py``: petuner against peft + transformers' Trainer on other batches.

- ``labelled``: fully labelled plain-text rows (bbc_text, 4 × 256 tokens, evaluation batches of 16 as by default,
  LoRA r=8 on q/k/v/o, dropout 0, constant schedule): every position carries a label, so labelled logits save
  nothing. petuner by default, with chunks of 1,024, compiled (``trainer.compile=true``: each decoder layer),
  without the chunked loss, and also without the lean SwiGLU (the defaults before them), against peft +
  Trainer, eager and with its own ``torch_compile=True`` (the whole model).
- ``packed``: chatterbot SFT, batch 8, max length 256: petuner with ``data.packing=true`` against petuner
  unpacked and peft + Trainer on padded batches; compared by real (non-padding) tokens/s, since a packed
  step holds more examples than a padded one.
- ``long``: 4 × 1024-token bbc_text rows: peak memory, petuner by default, without the chunked loss and also
  without the lean SwiGLU, against peft + Trainer.

Contenders run as separate processes, interleaved (repeat 1 runs each once, then repeat 2...); a compiled
contender's first step holds the compilation (inductor's cache on disk makes later runs' shorter). Peak memory
is the process's peak RSS (CUDA: max allocated), with a breakdown by phase (``memory_phases.py``).
Writes benchmarks/results/vs_peft_<case>[_live].{json,md}.

    .venv/bin/python benchmarks/vs_peft.py --case labelled --repeats 3 --contenders petuner peft+Trainer
    .venv/bin/python benchmarks/vs_peft.py --case long --repeats 1 --live-memory
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
COMPILE, NO_CHUNK, PLAIN_MLP = "trainer.compile=true", "trainer.loss_chunk=null", "trainer.lean_swiglu=false"
LORA_QKVO = ("adapter.target_modules=[q_proj,k_proj,v_proj,o_proj]", "adapter.dropout=0")
CASES: dict[str, dict[str, Any]] = {
    "labelled": {"title": "fully labelled plain-text rows: bbc_text, 4 × 256 tokens",
                 "overrides": ("data=bbc_text", "data.max_length=256", "trainer.batch_size=4",
                               "trainer.eval_batch_size=16", "optimizer.schedule=constant", *LORA_QKVO),
                 "contenders": {"petuner": (), "petuner-chunk-1024": ("trainer.loss_chunk=1024",),
                                "petuner-unchunked": (NO_CHUNK,),
                                "petuner-plain-mlp": (NO_CHUNK, PLAIN_MLP), "petuner-compiled": (COMPILE,),
                                "peft+Trainer": (), "peft+Trainer-compiled": (COMPILE,)},
                 "pairs": [("petuner", "peft+Trainer"), ("petuner-compiled", "peft+Trainer"),
                           ("petuner-compiled", "peft+Trainer-compiled"), ("peft+Trainer-compiled", "peft+Trainer"),
                           ("petuner-compiled", "petuner"),
                           ("petuner-unchunked", "peft+Trainer"), ("petuner", "petuner-unchunked"),
                           ("petuner-unchunked", "petuner-plain-mlp"), ("petuner", "petuner-chunk-1024")],
                 "steps": 6, "rate": "step"},
    "packed": {"title": "chatterbot SFT, batch 8, max length 256",
               "overrides": ("data=chatterbot", "data.max_length=256", "trainer.batch_size=8", *LORA_QKVO),
               "contenders": {"petuner-packed": ("data.packing=true",), "petuner": (), "peft+Trainer": ()},
               "pairs": [("petuner-packed", "peft+Trainer"), ("petuner-packed", "petuner"),
                         ("petuner", "peft+Trainer")],
               "steps": 4, "rate": "tokens"},
    "long": {"title": "4 × 1024-token bbc_text rows",
             "overrides": ("data=bbc_text", "data.max_length=1024", "trainer.batch_size=4", "trainer.eval_batch_size=4",
                           "optimizer.schedule=constant", *LORA_QKVO),
             "contenders": {"petuner": (), "petuner-unchunked": (NO_CHUNK,),
                            "petuner-plain-mlp": (NO_CHUNK, PLAIN_MLP), "peft+Trainer": ()},
             "pairs": [("petuner", "peft+Trainer"), ("petuner-unchunked", "peft+Trainer"),
                       ("petuner", "petuner-unchunked"), ("petuner-unchunked", "petuner-plain-mlp")],
             "steps": 2, "rate": "step"},
}
MODEL = "smollm2_135m"


def run_case(case: str, repeats: int, note: str, spawn: Callable[..., dict[str, Any]],
             summarise: Callable[..., dict[str, Any]], matmul_peak: Callable[[], tuple[float, str]],
             live_memory: bool = False, only: list[str] | None = None) -> None:
    """``live_memory``: the children map every allocation over 64 KiB afresh (``MALLOC_MMAP_THRESHOLD_``), so
    their peak RSS is their live tensors' peak, free of glibc's heap fragmentation (which moved peak RSS by
    ±15% between identical runs here); steps are much slower, so only the memory figures count."""
    import torch

    if live_memory:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 << 10)  # the children inherit it

    spec = dict(CASES[case])
    if only:  # a subset of the contenders, and the ratios among them
        spec["contenders"] = {k: v for k, v in spec["contenders"].items() if k in only}
        spec["pairs"] = [(a, b) for a, b in spec["pairs"] if a in only and b in only]
    peak, what = matmul_peak()
    loads: list[str] = []
    runs: dict[str, list[dict[str, Any]]] = {}
    start = time.perf_counter()
    for rep in range(repeats):
        for name, extra in spec["contenders"].items():
            contender = "peft+Trainer" if name.startswith("peft+Trainer") else "petuner"
            loads.append(" ".join(Path("/proc/loadavg").read_text().split()[:3]))
            r = spawn(contender, MODEL, 0.0, spec["steps"], *spec["overrides"], *extra)
            runs.setdefault(name, []).append(r)
            print(f"rep {rep + 1} {case} {name}: median step {statistics.median(r['step_s'][1:]) * 1e3:.0f} ms, "
                  f"peak {r['peak_bytes'] / 2**20:.0f} MiB [{time.perf_counter() - start:.0f} s]", flush=True)
    cuda = torch.cuda.is_available()
    threads = torch.get_num_threads()
    machine = (torch.cuda.get_device_name() + ", bf16" if cuda
               else f"CPU, {threads} threads, fp32" + (f", {note}" if note else ""))
    result = {"case": case, "live_memory": live_memory, "title": spec["title"], "model": MODEL, "machine": machine,
              "repeats": repeats,
              "steps": spec["steps"], "overrides": list(spec["overrides"]), "peak_flops": peak, "peak_what": what,
              "loadavg_at_each_run": loads, "wall_s": time.perf_counter() - start,
              "contenders": {k: list(v) for k, v in spec["contenders"].items()},
              "summary": {k: summarise(v, peak) for k, v in runs.items()},
              "ratios": ratios(runs, spec["rate"], spec["pairs"]), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    name = f"vs_peft_{case}" + ("_live" if live_memory else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def _real_tokens_per_s(run: dict[str, Any]) -> float:
    return sum(run["tokens"][1:]) / sum(run["step_s"][1:])


def ratios(runs: dict[str, list[dict[str, Any]]], rate: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Per repeat, "a / b" for each of the case's ``pairs``: step time (or real tokens/s) and peak memory."""
    out = {}
    for a_name, b_name in pairs:
        per_repeat = []
        for a, b in zip(runs[a_name], runs[b_name], strict=True):
            if rate == "step":
                speed = statistics.median(a["step_s"][1:]) / statistics.median(b["step_s"][1:])
            else:
                speed = _real_tokens_per_s(a) / _real_tokens_per_s(b)
            per_repeat.append({"speed": speed, "memory": a["peak_bytes"] / b["peak_bytes"]})
        out[f"{a_name} / {b_name}"] = {key: {"median": statistics.median(r[key] for r in per_repeat),
                                             "min": min(r[key] for r in per_repeat),
                                             "max": max(r[key] for r in per_repeat)}
                                       for key in ("speed", "memory")}
    return out


def _spread(r: dict[str, float]) -> str:
    return f"{r['median']:.2f} [{r['min']:.2f}–{r['max']:.2f}]"


def markdown(result: dict[str, Any]) -> str:
    names = list(result["summary"])
    rate = CASES[result["case"]]["rate"]
    what, better = ("step time", "below 1: faster") if rate == "step" else ("real tokens/s", "above 1: faster")
    lines = [f"**{result['title']}** — {result['model']}, LoRA r=8 on q/k/v/o, dropout 0; {result['machine']}; "
             f"{result['repeats']} interleaved repeats of {result['steps']} steps (first step not timed); load "
             f"average (1, 5, 15 min) at each run's start: {'; '.join(result['loadavg_at_each_run'])}."
             + (" **Live memory run**: every allocation over 64 KiB mapped afresh, so peak RSS = the live tensors' "
                "peak; step times are not comparable." if result.get("live_memory") else ""), "",
             "| contender | overrides | step time | first step | real tokens/s | peak memory |",
             "|---|---|---:|---:|---:|---:|"]
    for name in names:
        s = result["summary"][name]
        tok = statistics.median(_real_tokens_per_s(run) for run in result["runs"][name])
        first = statistics.median(run["step_s"][0] for run in result["runs"][name])
        overrides = " ".join(result["contenders"][name]) or "—"
        lines.append(f"| {name} | {overrides} | {s['step_s']['median'] * 1e3:.0f} ms | {first:.1f} s | {tok:.0f} | "
                     f"{s['peak_bytes']['median'] / 2**20:.0f} MiB |")
    lines += ["", f"Ratios per repeat, median [min–max] ({what}: {better}; memory: below 1: smaller):", "",
              f"| ratio | {what} | peak memory |", "|---|---:|---:|"]
    lines += [f"| {pair} | {_spread(r['speed'])} | {_spread(r['memory'])} |" for pair, r in result["ratios"].items()]
    lines += ["", "Peak memory by phase (MiB, median over repeats; each phase's own high-water mark):", "",
              "| contender | " + " | ".join(phases := sorted({p for n in names for r in result["runs"][n]
                                                              for p in r["phase_peak_bytes"]})) + " |",
              "|---|" + "---:|" * len(phases)]
    for name in names:
        cells = [statistics.median(r["phase_peak_bytes"].get(p, 0.0) for r in result["runs"][name]) / 2**20
                 for p in phases]
        lines.append(f"| {name} | " + " | ".join(f"{c:.0f}" if c else "—" for c in cells) + " |")
    return "\n".join([*lines, ""])
