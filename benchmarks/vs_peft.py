"""LoRA training speed and memory: petuner's loop against peft + a plain torch loop and peft + transformers' Trainer.

The same LoRA (r=8, alpha=16 on q_proj/v_proj, each ``--dropouts`` value) on the same model (petuner's
``load_model``: the same weights), the same chatterbot batches in the same order (the order of petuner's
``Loop.step_batches``: epoch 0 shuffled with ``torch.randperm`` seeded by trainer.seed), batch 8,
fused AdamW, gradient clipping at 1.0, cosine schedule with 2 warmup steps, bf16 autocast on CUDA and fp32
on CPU. Contenders:

- ``petuner``: ``petuner.run.run``; step times and tokens/s read from the run's ``metrics.jsonl``.
- ``petuner-all-logits``: the same with ``trainer.labelled_logits=false`` and ``trainer.loss_chunk=null``: the
  output layer runs at every position, as in the peers, so this row is the loop against the loop. With
  ``--all-logits-mlp plain`` (the default) the lean SwiGLU is off too (the MLPs save what the peers' do), so
  the row measures the loop alone; ``lean`` keeps it on (the committed results before #30 ran that way).
- ``peft+torch``: ``peft.get_peft_model`` and the textbook loop (forward, backward, clip, step, schedule).
- ``peft+Trainer``: ``peft.get_peft_model`` and ``transformers.Trainer`` (max_steps, no evaluation, no saving,
  no reporting); a step is timed from ``on_step_begin`` to ``on_step_end``, which leaves out Trainer's batch
  prefetch (collation) and its logging (the other two time these inside the step): a slight edge to Trainer.

Each run is its own subprocess (peak RSS is a process-lifetime maximum; on CUDA the allocator's peak after
a reset), and runs are interleaved: repeat 1 runs every contender once, then repeat 2, ... The first step
of every run (warm-up: lazy allocations, optimizer state) and model loading and evaluation are not timed.
Model FLOPs utilisation = achieved training FLOP/s over this machine's matmul peak (the best of several
large ``torch.mm``, fp32 on CPU, bf16 on CUDA, measured in the same invocation) with training FLOPs per
step = tokens × (4·N + 2·N_trainable): N the weights of every linear layer (LoRA's and the output layer
included: forward 2N, backward to the activations 2N) and 2·N_trainable for the weight gradients of the
trained ones; attention's own products and the padding are not counted. Every run's first-step loss is
the base model's loss on the same first batch (LoRA's B starts at zero), so equal first losses show the
contenders did the same work. Writes benchmarks/results/vs_peft.{json,md,png}.

    .venv/bin/python benchmarks/vs_peft.py   # the defaults are what vs_peft.json ran (but --all-logits-mlp)
    .venv/bin/python benchmarks/vs_peft.py --models smollm2_135m --steps 6 --repeats 2 --out vs_peft_loop_alone

The load average (1, 5, 15 min) is read at every run's start and written with the results.

``--case labelled|packed|long`` runs the other comparisons (fully labelled rows, packed SFT, long rows;
``benchmarks/vs_peft_cases.py``), each with a per-phase peak-memory breakdown (``memory_phases.py``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CONTENDERS = ("petuner", "petuner-all-logits", "peft+torch", "peft+Trainer")
PEERS = ("petuner-all-logits", "peft+torch", "peft+Trainer")
COMMON = ("adapter=lora", "adapter.r=8", "adapter.alpha=16", "adapter.target_modules=[q_proj,v_proj]",
          "logger=none", "data=chatterbot", "data.max_length=128", "data.eval_size=8", "trainer.batch_size=8",
          "trainer.eval_batch_size=8", "trainer.save_every=null", "trainer.max_grad_norm=1.0",
          "trainer.seed=42", "optimizer=adamw", "optimizer.lr=2e-4", "optimizer.schedule=cosine",
          "optimizer.warmup_steps=2", "trainer.device=auto", "trainer.precision=auto")
DEFAULT_STEPS = {"tiny_llama": 15, "smollm2_135m": 6}
CASES = ("labelled", "packed", "long")  # benchmarks/vs_peft_cases.py


# --- one run (child process) ----------------------------------------------------------------------


def compose(model: str, dropout: float, steps: int, run_dir: Path, *extra: str) -> Any:
    from petuner.config import compose_config

    merged = dict(o.split("=", 1) for o in (*COMMON, f"model={model}", f"adapter.dropout={dropout}",
                                            f"trainer.max_steps={steps}", f"run_dir={run_dir}", *extra))
    return compose_config([f"{k}={v}" for k, v in merged.items()])  # later values of a key win


def linear_weights(model: Any) -> tuple[int, int]:
    """(N, N_trainable): elements of every nn.Linear weight (distinct storages), and of those that train."""
    from torch import nn

    seen: dict[int, Any] = {}  # by identity: a tied weight is one Parameter (data_ptr is 0 on the meta device)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            seen[id(module.weight)] = module.weight
    return (sum(w.numel() for w in seen.values()), sum(w.numel() for w in seen.values() if w.requires_grad))


def peak_bytes(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))


def run_petuner(cfg: Any) -> dict[str, Any]:
    import torch

    from petuner.adapters import build_adapter, inject
    from petuner.models import load_model
    from petuner.run import run
    from petuner.train.device import resolve_device
    from petuner.train.logging import read_metrics

    run(cfg)
    rows = [m for m in read_metrics(Path(cfg.run_dir)) if "train/step_s" in m]
    skeleton = load_model(cfg.model, meta=True)  # the same structure, to count its linear weights
    torch.manual_seed(0)
    inject(skeleton, build_adapter(cfg.adapter), [])
    n, n_trainable = linear_weights(skeleton)
    return {"step_s": [m["train/step_s"] for m in rows], "tokens": [m["train/tokens_per_s"] * m["train/step_s"]
                                                                    for m in rows],
            "loss": [m["train/loss"] for m in rows], "peak_bytes": peak_bytes(resolve_device(cfg.trainer.device)),
            "n_linear": n, "n_trainable": n_trainable}


def peft_setup(cfg: Any) -> tuple[Any, Any, Any, Any]:
    """The base model with peft's LoRA, the data in petuner's order, the device and autocast dtype."""
    import torch
    from peft import LoraConfig, get_peft_model

    from petuner.data import build_data
    from petuner.models import load_model, load_tokenizer
    from petuner.train.device import resolve_device, resolve_precision

    data = build_data(cfg.data, load_tokenizer(cfg.model), cfg.model.task)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.trainer.seed)).tolist()
    examples = [data.train[i] for i in order[:cfg.trainer.max_steps * cfg.trainer.batch_size]]
    model = load_model(cfg.model)
    torch.manual_seed(cfg.trainer.seed)
    a = cfg.adapter
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                             target_modules=list(a.target_modules), task_type="CAUSAL_LM"))
    device = resolve_device(cfg.trainer.device)
    return model.to(device), (examples, data.collate), device, resolve_precision(cfg.trainer.precision, device)


def run_peft_torch(cfg: Any) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    model, (examples, collate), device, dtype = peft_setup(cfg)
    t = cfg.trainer
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optimizer.lr, weight_decay=0.0, fused=True)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.optimizer.warmup_steps,
                              num_training_steps=t.max_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict[str, list[float]] = {"step_s": [], "tokens": [], "loss": []}
    model.train()
    batches = iter(DataLoader(examples, batch_size=t.batch_size, collate_fn=collate))
    for _ in range(t.max_steps):
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        out["loss"].append(loss.item())
        torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        out["step_s"].append(time.perf_counter() - t0)
        out["tokens"].append(int(batch["attention_mask"].sum()))
    n, n_trainable = linear_weights(model)
    return {**out, "peak_bytes": peak_bytes(device), "n_linear": n, "n_trainable": n_trainable}


def run_peft_trainer(cfg: Any, out_dir: Path) -> dict[str, Any]:
    import torch
    from torch.utils.data import IterableDataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, (examples, collate), device, dtype = peft_setup(cfg)
    t = cfg.trainer
    tokens = [sum(len(e["input_ids"]) for e in examples[i:i + t.batch_size])
              for i in range(0, len(examples), t.batch_size)]

    class InOrder(IterableDataset):  # Trainer does not shuffle an iterable dataset: petuner's order
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(examples)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t0, self.step_s, self.loss = 0.0, [], []

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.step_s.append(time.perf_counter() - self.t0)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.loss.append(float(logs["loss"]))

    timer = Timer()
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        learning_rate=cfg.optimizer.lr, weight_decay=0.0, lr_scheduler_type=cfg.optimizer.schedule,
        warmup_steps=cfg.optimizer.warmup_steps, max_grad_norm=t.max_grad_norm, optim="adamw_torch_fused",
        logging_strategy="steps", logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=t.seed,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device.type == "cpu",
        torch_compile=bool(t.compile))
    trainer = Trainer(model=model, args=args, train_dataset=InOrder(), data_collator=collate, callbacks=[timer])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    n, n_trainable = linear_weights(model)
    # Tokens as petuner counts them (attention-mask ones = the examples' lengths before padding).
    return {"step_s": timer.step_s, "tokens": tokens[:len(timer.step_s)], "loss": timer.loss,
            "peak_bytes": peak_bytes(device), "n_linear": n, "n_trainable": n_trainable}


def child(contender: str, model: str, dropout: float, steps: int, *extra: str) -> dict[str, Any]:
    import peft
    import transformers
    from memory_phases import PhasePeaks

    import petuner.data
    import petuner.models
    import petuner.run
    from petuner.train.loop import Loop

    phases = PhasePeaks()  # where each contender's peak memory sits
    if contender.startswith("petuner"):
        for name, phase in (("load_model", "load model"), ("build_data", "data"), ("inject", "adapter")):
            phases.wrap(petuner.run, name, phase)
        phases.wrap(Loop, "run_eval", "evaluation")
        phases.wrap(Loop, "train", "training")
    else:
        phases.wrap(petuner.models, "load_model", "load model")
        phases.wrap(petuner.data, "build_data", "data")
        phases.wrap(peft, "get_peft_model", "adapter")
        phases.wrap(transformers.Trainer, "train", "training")
    with tempfile.TemporaryDirectory() as tmp:
        all_logits = (("trainer.labelled_logits=false", "trainer.loss_chunk=null") if contender == "petuner-all-logits"
                      else ())
        cfg = compose(model, dropout, steps, Path(tmp) / "run", *all_logits, *extra)
        if contender.startswith("petuner"):
            result = run_petuner(cfg)
        elif contender == "peft+torch":
            result = run_peft_torch(cfg)
        else:
            result = run_peft_trainer(cfg, Path(tmp) / "trainer")
    peaks = phases.finish()  # resetting the high-water mark also resets ru_maxrss: the peak is the phases' largest
    return {**result, "peak_bytes": max(peaks.values()), "phase_peak_bytes": peaks}


# --- the benchmark (parent process) ---------------------------------------------------------------


def matmul_peak() -> tuple[float, str]:
    """The best FLOP/s of a large square torch.mm (fp32 on CPU, bf16 on CUDA), and what was timed."""
    import torch

    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    device = "cuda" if cuda else "cpu"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best, f"torch.mm {n}×{n} {str(dtype).removeprefix('torch.')}"


def spawn(contender: str, model: str, dropout: float, steps: int, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", contender, model, str(dropout), str(steps), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{contender} {model} dropout={dropout} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]], peak_flops: float) -> dict[str, Any]:
    """Pooled over repeats, first step of each run excluded."""
    step_s = [s for r in runs for s in r["step_s"][1:]]
    tok_s = [k / s for r in runs for k, s in zip(r["tokens"][1:], r["step_s"][1:], strict=True)]
    n, n_trainable = runs[0]["n_linear"], runs[0]["n_trainable"]
    flop_s = [k * (4 * n + 2 * n_trainable) for k in tok_s]  # tokens/s × FLOPs per token
    return {"step_s": spread(step_s), "tokens_per_s": spread(tok_s),
            "peak_bytes": spread([r["peak_bytes"] for r in runs]),
            "flop_s": spread(flop_s), "mfu": statistics.median(flop_s) / peak_flops,
            "first_loss": [r["loss"][0] for r in runs], "last_loss": [r["loss"][-1] for r in runs],
            "n_linear": n, "n_trainable": n_trainable, "repeats": len(runs), "timed_steps": len(step_s)}


def paired_ratios(ours: list[dict[str, Any]], peer: list[dict[str, Any]]) -> dict[str, float]:
    """petuner's step time over the peer's on the same batch of the same repeat (first step excluded):
    each batch's length, and the machine's load at that minute, cancel out."""
    ratios = [a / b for x, y in zip(ours, peer, strict=True)
              for a, b in zip(x["step_s"][1:], y["step_s"][1:], strict=True)]
    q = statistics.quantiles(ratios, n=4)
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"LoRA r=8, alpha=16 on q_proj/v_proj, batch 8, chatterbot (max length 128), fused AdamW, clipping 1.0; "
             f"{result['machine']}. {result['repeats']} interleaved repeats per contender; step time and tokens/s "
             "pooled over the repeats' steps (first step of each run excluded): median [min–max]; peak memory: "
             f"{result['memory']}, median [min–max] over the repeats. Matmul peak: {result['peak_flops'] / 1e9:.1f} "
             f"GFLOP/s ({result['peak_what']}). Ratios are petuner / peer (below 1: petuner faster or smaller): "
             "time, the median [interquartile range] of the per-step ratios on the same batch of the same repeat; "
             "memory, of the medians. petuner-all-logits: every position's logits, no chunked loss, "
             + {"plain": "lean SwiGLU off (the loop alone).", "lean": "lean SwiGLU on.",
                None: "lean SwiGLU on (runs before the --all-logits-mlp switch)."}[result.get("all_logits_mlp")],
             "", "Load average (1, 5, 15 min) at each run's start: "
             + ("; ".join(result["loadavg_at_each_run"]) if "loadavg_at_each_run" in result else "not recorded")
             + ".", "",
             "| model | dropout | contender | step time | tokens/s | peak memory | MFU | time ratio | memory ratio |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for key, rows in result["settings"].items():
        model, dropout = key.split("@")
        ours = rows["petuner"]
        for name in CONTENDERS:
            s = rows[name]
            t, k, m = s["step_s"], s["tokens_per_s"], s["peak_bytes"]
            ratio_t = ratio_m = "—"
            if name != "petuner":
                r = result["paired_time_ratio"][key][name]
                ratio_t = f"{r['median']:.2f} [{r['q1']:.2f}–{r['q3']:.2f}]"
                ratio_m = f"{ours['peak_bytes']['median'] / m['median']:.2f}"
            lines.append(f"| {model} | {dropout} | {name} | {t['median'] * 1e3:.0f} ms [{t['min'] * 1e3:.0f}–"
                         f"{t['max'] * 1e3:.0f}] | {k['median']:.0f} [{k['min']:.0f}–{k['max']:.0f}] | "
                         f"{m['median'] / 2**20:.0f} MiB [{m['min'] / 2**20:.0f}–{m['max'] / 2**20:.0f}] | "
                         f"{s['mfu']:.1%} | {ratio_t} | {ratio_m} |")
    lines += ["", "FLOPs per step = tokens × (4·N + 2·N_trainable), N = every linear layer's weights (LoRA's and "
              "the output layer included), tokens = non-padding tokens: "
              + "; ".join(f"{k.split('@')[0]}: N = {v['petuner']['n_linear']:,}, N_trainable = "
                          f"{v['petuner']['n_trainable']:,}" for k, v in result["settings"].items()
                          if k.endswith(f"@{result['dropouts'][0]}")) + ".", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result["settings"])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        rows = result["settings"][key]
        med = [rows[c]["step_s"]["median"] * 1e3 for c in CONTENDERS]
        err = [[m - rows[c]["step_s"]["min"] * 1e3 for m, c in zip(med, CONTENDERS, strict=True)],
               [rows[c]["step_s"]["max"] * 1e3 - m for m, c in zip(med, CONTENDERS, strict=True)]]
        ax.bar(range(len(CONTENDERS)), med, yerr=err, capsize=4,
               color=["tab:blue", "tab:cyan", "tab:orange", "tab:green"])
        ax.set_xticks(range(len(CONTENDERS)), CONTENDERS, rotation=20, fontsize=8)
        ax.set_title(key.replace("@", ", dropout "), fontsize=9)
        ax.set_ylabel("step time, ms (median, min–max)", fontsize=8)
    fig.suptitle(f"LoRA training step: petuner vs peft ({result['machine_short']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_STEPS), choices=list(DEFAULT_STEPS))
    parser.add_argument("--steps", nargs="+", type=int, default=list(DEFAULT_STEPS.values()),
                        help="steps per run, one per model (the first is not timed)")
    parser.add_argument("--dropouts", nargs="+", type=float, default=[0.05])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="", help="anything else about the machine, written next to the numbers "
                        "(the load average at every run's start is recorded anyway)")
    parser.add_argument("--all-logits-mlp", choices=["plain", "lean"], default="plain",
                        help="petuner-all-logits: plain (lean SwiGLU off: the loop alone) or lean (on)")
    parser.add_argument("--out", default="vs_peft", help="results file name under benchmarks/results/")
    parser.add_argument("--render", action="store_true", help="rewrite the .md and .png from the saved .json")
    parser.add_argument("--case", choices=["lora", *CASES], default="lora",
                        help="lora: the chatterbot comparison above; the others: see CASES")
    parser.add_argument("--live-memory", action="store_true",
                        help="with --case: peak memory of live tensors, without heap fragmentation (slow steps)")
    parser.add_argument("--contenders", nargs="+", help="with --case: run only these of the case's contenders")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        contender, model, dropout, steps, *extra = args.child
        print("RESULT " + json.dumps(child(contender, model, float(dropout), int(steps), *extra)))
        return
    if args.case != "lora":
        from vs_peft_cases import run_case

        run_case(args.case, args.repeats, args.note, spawn, summarise, matmul_peak, args.live_memory, args.contenders)
        return
    if args.render:
        render(json.loads((RESULTS / f"{args.out}.json").read_text()), args.out)
        return
    if len(args.steps) != len(args.models):
        parser.error("--steps needs one value per model")

    import torch

    peak, what = matmul_peak()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    loads: list[str] = []
    plain = ("trainer.lean_swiglu=false",) if args.all_logits_mlp == "plain" else ()
    start = time.perf_counter()
    for rep in range(args.repeats):
        for model, steps in zip(args.models, args.steps, strict=True):
            for dropout in args.dropouts:
                for contender in CONTENDERS:
                    loads.append(" ".join(Path("/proc/loadavg").read_text().split()[:3]))
                    r = spawn(contender, model, dropout, steps, *(plain if contender == "petuner-all-logits" else ()))
                    runs.setdefault(f"{model}@{dropout}", {}).setdefault(contender, []).append(r)
                    print(f"rep {rep + 1} {model} dropout={dropout} {contender}: median step "
                          f"{statistics.median(r['step_s'][1:]) * 1e3:.0f} ms, peak {r['peak_bytes'] / 2**20:.0f} MiB, "
                          f"first loss {r['loss'][0]:.4f}  [{time.perf_counter() - start:.0f} s]", flush=True)
    peak2, _ = matmul_peak()  # the machine is shared: the better of the two measurements
    peak = max(peak, peak2)
    cuda = torch.cuda.is_available()
    machine_short = torch.cuda.get_device_name() + ", bf16" if cuda else f"CPU, {torch.get_num_threads()} threads, fp32"
    result = {"machine": machine_short + (f", {args.note}" if args.note and not cuda else ""),
              "machine_short": machine_short, "loadavg_at_each_run": loads, "all_logits_mlp": args.all_logits_mlp,
              "memory": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (model loading included)",
              "torch": torch.__version__, "repeats": args.repeats, "dropouts": args.dropouts,
              "steps": dict(zip(args.models, args.steps, strict=True)), "peak_flops": peak, "peak_what": what,
              "wall_s": time.perf_counter() - start,
              "settings": {k: {c: summarise(v[c], peak) for c in CONTENDERS} for k, v in runs.items()},
              "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    render(result, args.out)


def render(result: dict[str, Any], name: str = "vs_peft") -> None:
    """Paired ratios from the raw runs, then the .json, .md and .png."""
    result["paired_time_ratio"] = {k: {p: paired_ratios(v["petuner"], v[p]) for p in PEERS}
                                   for k, v in result["runs"].items()}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{name}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
