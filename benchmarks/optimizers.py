"""Optimizer memory and speed for full fine-tuning: adamw, adamw8bit, galore, galore8bit against torch AdamW.

Every optimizer trains the same model on the same batches (chatterbot, batch 4 of at most 64 tokens, no
clipping) for the same steps through ``petuner.run``; each run is its own subprocess, since peak RSS is a
process-lifetime maximum on CPU. Reported per run: the exact optimizer-state bytes (``memory/optimizer_state_bytes``:
the state tensors' storages, uint8 codes and absmaxes included), parameter and gradient bytes, peak RSS,
median step time (step 1 excluded: it builds state and, for GaLore, runs the SVDs) and the first step's
time, and the final training and held-out loss; ratios are against AdamW of the same model and sweep.
Writes benchmarks/results/optimizers.{json,md}.

    .venv/bin/python benchmarks/optimizers.py [--models llama_small smollm2_135m] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COMMON = ("adapter=none", "logger=none", "data.max_length=64", "data.eval_size=32", "trainer.batch_size=4",
          "trainer.eval_batch_size=16", "trainer.save_every=null", "trainer.max_grad_norm=null",
          "optimizer.warmup_steps=2", "trainer.device=cpu")
# A Llama shaped like SmolLM2 (its 49,152-token vocabulary, 3:1 grouped-query attention), 4 layers of width
# 768: big enough for the optimizer state to matter, small enough for a 2-core CPU.
LLAMA_SMALL = ("model=tiny_llama", "model.random_init.hidden_size=768", "model.random_init.intermediate_size=2048",
               "model.random_init.num_hidden_layers=4", "model.random_init.num_attention_heads=12",
               "model.random_init.num_key_value_heads=4")
MODELS = {"llama_small": (*LLAMA_SMALL, "optimizer.lr=1e-3"),
          "smollm2_135m": ("model=smollm2_135m", "optimizer.lr=1e-4")}
OPTIMIZERS = {
    "adamw": ("optimizer=adamw",),
    "adamw8bit": ("optimizer=adamw8bit",),
    "adamw8bit (8-bit embeddings)": ("optimizer=adamw8bit", "optimizer.embeddings_32bit=false"),
    "galore r128": ("optimizer=galore", "optimizer.rank=128"),
    "galore r128 scale 1": ("optimizer=galore", "optimizer.rank=128", "optimizer.scale=1.0"),
    "galore8bit r128": ("optimizer=galore8bit", "optimizer.rank=128"),
    "galore8bit r128 per-layer": ("optimizer=galore8bit", "optimizer.rank=128", "optimizer.per_layer=true"),
}


def child(model: str, optimizer: str, steps: int, run_dir: Path) -> dict:
    """One run in this process; returns its measurements."""
    from petuner.config import compose_config
    from petuner.models import load_model
    from petuner.optim.groups import galore_matrices
    from petuner.run import run
    from petuner.train.logging import read_metrics

    cfg = compose_config([*COMMON, *MODELS[model], *OPTIMIZERS[optimizer], f"trainer.max_steps={steps}",
                          f"run_dir={run_dir}"])
    info = run(cfg)
    rows = [m for m in read_metrics(run_dir) if "train/loss" in m]
    out = {"results": info["results"], "parameters": info["total_parameters"],
           "first_step_s": rows[0]["train/step_s"],
           "median_step_s": statistics.median(m["train/step_s"] for m in rows[1:]),
           "final_train_loss": statistics.mean(m["train/loss"] for m in rows[-3:])}
    if "rank" in cfg.optimizer:
        skeleton = load_model(cfg.model, meta=True)
        named = list(skeleton.named_parameters())
        chosen = set(galore_matrices(skeleton, named, int(cfg.optimizer.rank)))
        out["projected_share"] = sum(p.numel() for n, p in named if n in chosen) / info["total_parameters"]
    return out


def markdown(result: dict) -> str:
    from petuner.report import markdown_table

    lines = [f"Full fine-tuning on {result['device']} (batch 4, chatterbot, "
             "max length 64, no clipping); ratios against torch AdamW of the same model.", ""]
    for model, runs in result["models"].items():
        base = runs["adamw"]
        state0 = base["results"]["memory/optimizer_state_bytes"]
        steps = result["steps_per_model"][model]
        lines += [f"**{model}** ({base['parameters'] / 1e6:.1f}M parameters; {steps} steps)", ""]
        total0 = sum(base["results"][k] for k in ("memory/param_bytes", "memory/grad_bytes",
                                                  "memory/optimizer_state_bytes"))
        rows = []
        for name, r in runs.items():
            m = r["results"]
            state = m["memory/optimizer_state_bytes"]
            total = m["memory/param_bytes"] + m["memory/grad_bytes"] + state
            rows.append([name, f"{state / 2**20:.1f} MiB", f"{state / state0:.2f} ({1 - state / state0:.0%} saved)",
                         f"{total / 2**20:.0f} MiB", f"{total / total0:.2f}",
                         f"{m['memory/peak_rss_bytes'] / 2**30:.2f} GiB",
                         f"{r['median_step_s']:.2f} s ({r['median_step_s'] / base['median_step_s']:.2f}×)",
                         f"{r['first_step_s']:.2f} s", f"{r['final_train_loss']:.3f}", f"{m['eval/loss_after']:.3f}"])
        lines += markdown_table(["optimizer", "optimizer state", "vs AdamW", "params + grads + state", "vs AdamW",
                                 "peak RSS", "median step", "first step", "final train loss", "held-out loss"],
                                rows).splitlines()
        saved = {name: 1 - r["results"]["memory/optimizer_state_bytes"] / state0 for name, r in runs.items()}
        lines += ["", "Paper claims on optimizer state, against what this run measured: 8-bit states 75% smaller "
                  f"(adamw8bit: {saved['adamw8bit']:.0%}, with 8-bit embeddings "
                  f"{saved['adamw8bit (8-bit embeddings)']:.0%}); "
                  f"GaLore 65.5% smaller ({saved['galore r128']:.0%}); 8-bit GaLore 82.5% smaller "
                  f"({saved['galore8bit r128']:.0%})."]
        share = next((r["projected_share"] for r in runs.values() if "projected_share" in r), None)
        if share is not None:
            lines += ["", f"GaLore projects the linear weights other than the output layer: {share:.0%} of the "
                      "parameters; the embedding, norms (and here the tied output layer) keep full Adam state."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=12, help="steps for llama_small (smollm2_135m: half)")
    parser.add_argument("--reuse", action="store_true", help="reuse runs saved under results/tmp by an earlier call")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "OPTIMIZER", "STEPS", "RUN_DIR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, optimizer, steps, run_dir = args.child
        print("RESULT " + json.dumps(child(model, optimizer, int(steps), Path(run_dir))))
        return

    import torch

    result: dict = {"steps": args.steps, "device": f"CPU ({torch.get_num_threads()} threads), fp32",
                    "steps_per_model": {}, "models": {}}
    for model in args.models:
        steps = args.steps if model == "llama_small" else max(args.steps // 2, 4)
        result["steps_per_model"][model] = steps
        result["models"][model] = {}
        for name in OPTIMIZERS:
            slug = re.sub(r"[^a-z0-9]+", "_", name)
            run_dir, saved = RESULTS / "tmp" / "optimizers" / model / slug, RESULTS / "tmp" / f"{model}_{slug}.json"
            if not (args.reuse and saved.exists()):
                shutil.rmtree(run_dir, ignore_errors=True)
                proc = subprocess.run([sys.executable, __file__, "--child", model, name, str(steps), str(run_dir)],
                                      capture_output=True, text=True, check=False)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not lines:
                    sys.exit(f"{model}/{name} failed:\n{proc.stderr[-3000:]}")
                saved.write_text(lines[-1].removeprefix("RESULT "))
                shutil.rmtree(run_dir, ignore_errors=True)
            result["models"][model][name] = json.loads(saved.read_text())
            print(model, name, json.dumps(result["models"][model][name]["results"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "optimizers.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "optimizers.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
