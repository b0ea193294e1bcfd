"""DPO on SmolLM2-135M + LoRA: it learns a real preference, and against TRL's DPOTrainer + peft, side by side.

The preference set is built offline from the packaged chatterbot corpus: each question's own answer is
chosen, another question's answer (a different one, drawn with a fixed seed) rejected. Two parts:

- ``learn``: ``petuner.run.run`` with ``loss=dpo`` (LoRA r=16 on every linear layer, the reference by the
  adapter switch); held-out reward accuracy, margins and loss before and after, and the greedy answers to
  held-out questions before (adapter off) and after: their unigram F1 against the chosen and against the
  rejected reply. Writes benchmarks/results/dpo_learn.{json,md}; with ``--loss kto`` the same pairs train KTO
  (each pair's two sides as labelled completions; held-out loss, reward margin and KL estimate), kto_learn.*.
- ``vs-trl``: the same DPO step (same model, LoRA, pairs in the same order, β, lr, batch, max_length,
  gradient checkpointing on or off in both, fp32 on CPU or bf16 autocast on CUDA) in petuner and in TRL's
  DPOTrainer with peft, each run in its own subprocess and interleaved (repeat 1 runs both, then repeat 2,
  ...); the first step is not timed. ``--history K`` puts K earlier exchanges of the corpus before each
  question (multi-turn prompts: longer sequences). Reported as ratios petuner / TRL of the median time per
  step, the process's peak memory (RSS on CPU, the allocator's peak on CUDA) and what training added to the
  memory held when it began. Writes benchmarks/results/dpo_vs_trl<suffix>.{json,md}.

    .venv/bin/python benchmarks/dpo.py learn    # the committed results ran these defaults
    .venv/bin/python benchmarks/dpo.py learn --loss kto --batch-size 16   # the same pairs, 8 a step, for KTO
    .venv/bin/python benchmarks/dpo.py vs-trl --repeats 3 --gradient-checkpointing on
    .venv/bin/python benchmarks/dpo.py vs-trl --repeats 3 --history 3 --max-length 2048 \
        --gradient-checkpointing on --suffix _multiturn                       # and off: _multiturn_no_checkpointing
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
COMMON = ("model=smollm2_135m", "loss=dpo", "loss.beta=0.1", "adapter=lora", "adapter.r=16", "adapter.alpha=32",
          "adapter.dropout=0", "logger=none", "data=hf", "data.max_length=128", "trainer.save_every=null",
          "optimizer.lr=5e-4", "optimizer.warmup_steps=2", "trainer.seed=0")


def build_pairs(path: Path, seed: int = 0, conversational: bool = False, history: int = 0) -> int:
    """chatterbot's questions, each with its own answer chosen and another question's answer rejected (as
    messages with ``conversational``: TRL renders only those with the chat template, as petuner renders all).
    ``history`` earlier exchanges of the corpus go before each question as a conversation (conversational
    only): longer sequences, as a multi-turn chat's, where the activations rather than the weights fill memory."""
    from petuner.assets import resolve
    from petuner.data.sources import read_chatterbot

    rows, seen = [], set()
    for row in read_chatterbot(Path(resolve("asset:chatterbot"))):
        if row["prompt"] not in seen and len(row["response"]) > 3:
            seen.add(row["prompt"])
            rows.append(row)
    rng = random.Random(seed)
    with path.open("w") as f:
        for i, row in enumerate(rows):
            other = rng.choice([r for r in rows if r["response"] != row["response"]])
            pair: dict[str, Any] = {"prompt": row["prompt"], "chosen": row["response"], "rejected": other["response"]}
            if conversational:
                earlier = [rows[(i - k) % len(rows)] for k in range(history, 0, -1)]
                prompt = [m for r in earlier for m in ({"role": "user", "content": r["prompt"]},
                                                       {"role": "assistant", "content": r["response"]})]
                pair = {"prompt": [*prompt, {"role": "user", "content": row["prompt"]}],
                        "chosen": [{"role": "assistant", "content": row["response"]}],
                        "rejected": [{"role": "assistant", "content": other["response"]}]}
            f.write(json.dumps(pair) + "\n")
    return len(rows)


def f1(answer: str, reference: str) -> float:
    a, b = answer.lower().split(), reference.lower().split()
    common = sum(min(a.count(w), b.count(w)) for w in set(a))
    return 0.0 if not common else 2 * common / (len(a) + len(b))


def greedy_answers(run_dir: Path, prompts: list[str]) -> tuple[list[str], list[str]]:
    """Greedy replies of the base (adapter off) and of the trained run."""
    from petuner.adapters import disabled_adapters
    from petuner.generate import Sampling, load_generator

    gen = load_generator(run_dir)
    sampling = Sampling(max_new_tokens=32)
    with disabled_adapters(gen.model):
        before = gen.answer(prompts, sampling)
    return before, gen.answer(prompts, sampling)


LEARN_METRICS = {"dpo": ("loss", "rewards/accuracies", "rewards/margins"), "kto": ("loss", "rewards/margins", "kl")}
LEARN_NOTES = {
    "dpo": "Before training every reward is 0 (the reference is the policy): ties, which count as not preferred, so "
           "the accuracy reads 0.",
    "kto": "Before training every reward and the KL estimate are 0 (the reference is the policy) and each row's loss "
           "is 0.5; rewards/margins is the desirable rows' mean reward less the undesirable rows'.",
}


def learn(args: argparse.Namespace) -> None:
    from datasets import Dataset

    from petuner.config import compose_config
    from petuner.run import run

    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "chatterbot_pairs.jsonl"
        n = build_pairs(pairs)
        common = [o if o != "loss=dpo" else f"loss={args.loss}" for o in COMMON]
        overrides = [*common, f"data.path={pairs}", f"data.eval_size={args.eval_size}",
                     f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.batch_size}",
                     f"trainer.eval_every={max(args.steps // 2, 1)}", f"run_dir={Path(tmp) / 'run'}"]
        start = time.perf_counter()
        info = run(compose_config(overrides))
        seconds = time.perf_counter() - start
        # the held-out pairs: the same seeded split petuner's data layer makes (data.split_seed=0)
        held_out = Dataset.from_json(str(pairs)).train_test_split(test_size=args.eval_size, seed=0)["test"]
        prompts = [held_out[i] for i in range(min(args.answers, len(held_out)))]
        before, after = greedy_answers(Path(tmp) / "run", [p["prompt"] for p in prompts])
    res = info["results"]
    keys = LEARN_METRICS[args.loss]
    figures = {f"{k}_{when}": res[f"eval/{k}_{when}"] for k in keys for when in ("before", "after")}
    answers = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], "before": b, "after": a}
               for p, b, a in zip(prompts, before, after, strict=True)]
    f1s = {f"{when}_vs_{side}": statistics.mean(f1(x[when], x[side]) for x in answers)
           for when in ("before", "after") for side in ("chosen", "rejected")}
    out = {"command": "benchmarks/dpo.py learn " + " ".join(sys.argv[2:]), "pairs": n, "steps": args.steps,
           "batch_size": args.batch_size, "train_seconds": seconds, "overrides": common, **figures, "greedy_f1": f1s,
           "answers": answers, "device": info["device"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.loss}_learn.json").write_text(json.dumps(out, indent=2))
    rows = "pairs" if args.loss == "dpo" else "labelled completions (each pair's two sides)"
    lines = [f"# {args.loss.upper()} on SmolLM2-135M + LoRA: chatterbot's answer against another question's", "",
             f"`{out['command']}`: {n} pairs, {args.eval_size} held out; {args.steps} steps of {args.batch_size} "
             f"{rows} ({seconds / 60:.1f} min on {info['device']}).", "",
             "| held out | before | after |", "|---|---|---|"]
    lines += [f"| eval/{k} | {figures[f'{k}_before']:.4f} | {figures[f'{k}_after']:.4f} |" for k in keys]
    lines += ["", LEARN_NOTES[args.loss], "",
              "Greedy answers to held-out questions, unigram F1 (mean) against the chosen and the rejected reply:", "",
              "| | vs chosen | vs rejected |", "|---|---|---|",
              f"| before (adapter off) | {f1s['before_vs_chosen']:.3f} | {f1s['before_vs_rejected']:.3f} |",
              f"| after | {f1s['after_vs_chosen']:.3f} | {f1s['after_vs_rejected']:.3f} |", ""]
    lines += [f"- {a['prompt']!r}: before {a['before']!r} → after {a['after']!r} (chosen {a['chosen']!r})"
              for a in answers[:6]]
    (RESULTS / f"{args.loss}_learn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# --- vs TRL: one run per subprocess ------------------------------------------------------------------

def resident() -> float:
    """The memory held now: the allocator's on CUDA, the resident set on CPU."""
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.memory_allocated())
    with open("/proc/self/status") as f:
        return next(float(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class TrainingPeak:
    """The process's peak memory, the peak while training, and what training added to what was held when it
    started (the activations, logits, gradients and optimizer state; the runtime, weights and data are in both)."""

    def start(self) -> None:
        from memory_phases import high_water, reset_high_water

        self.before = high_water()  # loading and preparing: the high-water mark is reset for training's own
        reset_high_water()
        self.at_start = resident()

    def figures(self) -> dict[str, float]:
        from memory_phases import high_water

        peak = high_water()
        return {"peak_bytes": max(self.before, peak), "train_peak_bytes": peak,
                "train_added_bytes": peak - self.at_start}


def child_petuner(pairs: Path, options: dict[str, Any], out: Path) -> dict[str, Any]:
    from petuner.config import compose_config
    from petuner.run import run
    from petuner.train.logging import read_metrics
    from petuner.train.loop import Loop

    peak, train = TrainingPeak(), Loop.train

    def measured(loop: Loop, start: int) -> dict[str, float]:
        peak.start()
        return train(loop, start)

    Loop.train = measured  # type: ignore[method-assign]
    run(compose_config([*COMMON, f"data.path={pairs}", "data.eval_size=8", f"trainer.max_steps={options['steps']}",
                        f"trainer.batch_size={options['batch']}", f"data.max_length={options['max_length']}",
                        f"trainer.gradient_checkpointing={options['checkpointing']}", "trainer.eval_every=null",
                        "optimizer.schedule=constant", f"run_dir={out}"]))
    seconds = [m["train/step_s"] for m in read_metrics(out) if "train/step_s" in m][1:]
    return {"step_s": statistics.median(seconds), **peak.figures()}


def child_trl(pairs: Path, options: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from petuner.config import compose_config
    from petuner.models import load_model, load_tokenizer

    cfg = compose_config([*COMMON, f"data.path={pairs}", "run_dir=."])
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    times: list[float] = []
    peak = TrainingPeak()

    class Timer(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            peak.start()

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    cuda = torch.cuda.is_available()
    args = DPOConfig(output_dir=str(out), beta=0.1, learning_rate=5e-4, lr_scheduler_type="constant",
                     per_device_train_batch_size=options["batch"], max_steps=options["steps"],
                     max_length=options["max_length"], gradient_checkpointing=options["checkpointing"],
                     report_to="none", save_strategy="no", logging_steps=10_000, use_cpu=not cuda, bf16=cuda, seed=0,
                     max_grad_norm=1.0, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    trainer = DPOTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(pairs))["train"],
                         processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
    trainer.train()
    return {"step_s": statistics.median(times[1:]), **peak.figures()}


MEASURES = {"step_s": "time per step (s)", "peak_bytes": "process peak (MiB)",
            "train_added_bytes": "added by training (MiB)"}


def vs_trl(args: argparse.Namespace) -> None:
    options = {"steps": args.steps, "batch": args.batch_size, "max_length": args.max_length,
               "checkpointing": args.gradient_checkpointing == "on"}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "pairs.jsonl"
        build_pairs(pairs, conversational=True, history=args.history)
        rows: dict[str, list[dict[str, Any]]] = {"petuner": [], "trl": []}
        for repeat in range(args.repeats):
            for who in rows:
                out = Path(tmp) / f"{who}-{repeat}"
                done = subprocess.run([sys.executable, __file__, "child", who, str(pairs), json.dumps(options),
                                       str(out)], capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(done.stderr[-3000:])
                rows[who].append(json.loads(done.stdout.strip().splitlines()[-1]))
    med = {who: {k: statistics.median(r[k] for r in runs) for k in MEASURES} for who, runs in rows.items()}
    ratios = {k: med["petuner"][k] / med["trl"][k] for k in MEASURES}
    out = {"command": "benchmarks/dpo.py vs-trl " + " ".join(sys.argv[2:]), "runs": rows, "median": med,
           "ratio_petuner_over_trl": ratios, **options, "history": args.history}
    RESULTS.mkdir(exist_ok=True)
    name = f"dpo_vs_trl{args.suffix}"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    scale = {k: 1.0 if k == "step_s" else 2.0 ** -20 for k in MEASURES}
    lines = ["# DPO step: petuner against TRL's DPOTrainer + peft (SmolLM2-135M, LoRA r=16 all-linear)", "",
             f"`{out['command']}`: {args.repeats} interleaved repeats of {args.steps} steps, {args.batch_size} pairs "
             f"per step ({args.history} earlier exchanges before each question, max_length {args.max_length}), "
             f"gradient checkpointing {args.gradient_checkpointing} in both, first step untimed. Process peak: "
             "peak RSS on CPU (the runtime, weights and data included), the allocator's peak on CUDA; added by "
             "training: the peak while training less what was held when training began.", "",
             "| | " + " | ".join(MEASURES.values()) + " |", "|---|---|---|---|"]
    lines += [f"| {who} | " + " | ".join(f"{m[k] * scale[k]:.3f}" if k == "step_s" else f"{m[k] * scale[k]:.0f}"
                                         for k in MEASURES) + " |" for who, m in med.items()]
    lines += ["| petuner / TRL | " + " | ".join(f"{ratios[k]:.2f}x" for k in MEASURES) + " |"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    if sys.argv[1] == "child":
        who, pairs, options, out = sys.argv[2:6]
        child = child_petuner if who == "petuner" else child_trl
        result = child(Path(pairs), json.loads(options), Path(out))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("learn")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-size", type=int, default=48)
    p.add_argument("--answers", type=int, default=16)
    p.add_argument("--loss", choices=tuple(LEARN_METRICS), default="dpo", help="kto: the pairs as labelled completions")
    p.set_defaults(func=learn)
    v = sub.add_parser("vs-trl")
    v.add_argument("--steps", type=int, default=4)
    v.add_argument("--batch-size", type=int, default=4)
    v.add_argument("--repeats", type=int, default=2)
    v.add_argument("--history", type=int, default=0, help="earlier exchanges before each question")
    v.add_argument("--max-length", type=int, default=128)
    v.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on", help="in both (TRL's default: on)")
    v.add_argument("--suffix", default="", help="results file dpo_vs_trl<suffix>.{json,md}")
    v.set_defaults(func=vs_trl)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
