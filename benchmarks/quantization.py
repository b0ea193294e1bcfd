"""Quantized bases on SmolLM2-135M: held-out perplexity against bits per parameter.

fp32 base (a LoRA, B = 0 at init), QLoRA (bitsandbytes NF4 + double quantization, 4.127 bits) and
Fisher LQ-LoRA at average budgets of 2.75 / 3 / 3.25 / 3.5 bits (per-matrix configs chosen by the ILP from
``--grid``; ``--plain`` adds LQ-LoRA without the Fisher at the same budgets). Every linear layer of the
transformer body is quantized (``all-linear``: the tied embedding / lm_head stays fp32) and carries a
rank-r LoRA. Each variant is
evaluated on held-out BBC News text (perplexity) at initialisation and after the same short
fine-tune (same data order, steps, learning rate). Also reported: the bytes the quantized matrices
really hold (packed codes + scales) against their fp32 size. Writes benchmarks/results/quantization.{json,md}.

    .venv/bin/python benchmarks/quantization.py [--steps 10] [--eval-articles 16] [--grid bits_blocks]

The paper's claim checked at small scale: LQ-LoRA (Fisher) at ~3.5 bits matches QLoRA at 4.127; the
summary line gives the lowest budget whose fine-tuned perplexity is within 1% of QLoRA's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from petuner.adapters import adapter_layers, build_adapter, inject
from petuner.config import compose_config
from petuner.io import atomic_write_json, atomic_write_text
from petuner.models import load_model
from petuner.run import run

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (2.75, 3.0, 3.25, 3.5)
CALIBRATION_BATCHES = 4


def common(args: argparse.Namespace) -> list[str]:
    return ["model=smollm2_135m", "data=bbc_text", "data.max_length=256", f"data.eval_size={args.eval_articles}",
            "logger=none", "trainer.batch_size=4", "trainer.eval_batch_size=8", "trainer.save_every=null",
            "optimizer.lr=3e-4", "optimizer.warmup_steps=2",
            "adapter.target_modules=all-linear", f"adapter.r={args.r}", f"adapter.alpha={2 * args.r}",
            "adapter.dropout=0.0"]


def qlora_bytes(cfg: Any) -> tuple[int, int]:
    """Bytes the NF4 target weights hold (codes + absmax codes + second-level scales and codebooks), and fp32's."""
    model = load_model(cfg.model)
    inject(model, build_adapter(cfg.adapter))
    held = fp32 = 0
    for _, layer in adapter_layers(model):
        weight = layer.base_layer.weight
        state = weight.quant_state
        tensors = [weight.data, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        held += sum(t.numel() * t.element_size() for t in tensors)
        fp32 += 4 * layer.in_features * layer.out_features
    return held, fp32


def variant(name: str, args: argparse.Namespace, tune: bool, *overrides: str) -> dict[str, Any]:
    """One row; ``tune=False`` evaluates at initialisation only (a 1-step run, its result discarded)."""
    run_dir = RESULTS / "tmp" / f"quantization_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = args.steps if tune else 1
    cfg = compose_config([*common(args), f"trainer.max_steps={steps}", f"run_dir={run_dir}", *overrides])
    start = time.perf_counter()
    info = run(cfg)
    seconds = time.perf_counter() - start
    res = info["results"]
    row: dict[str, Any] = {"name": name, "seconds": round(seconds, 1),
                           "ppl_init": res["eval/perplexity_before"],
                           "ppl_tuned": res["eval/perplexity_after"] if tune else None}
    report = info.get("adapter_report", {})
    if "quantized_bytes" in report:
        row.update(quantized_bits=report["quantized_bits_per_param"], low_rank_bits=report["low_rank_bits_per_param"],
                   bytes=report["quantized_bytes"], fp32_bytes=4 * report["parameters"],
                   bits_histogram={str(b): sum(m["bits"] == b for m in report["matrices"].values())
                                   for b in (2, 3, 4, 8)},
                   configs=dict(sorted(Counter(f"{m['bits']}/{m['block_size']}/{m.get('group_size', 256)}"
                                               for m in report["matrices"].values()).items())))
    elif cfg.adapter.name == "qlora":
        held, fp32 = qlora_bytes(cfg)
        row.update(quantized_bits=report["bits_per_param"], bytes=held, fp32_bytes=fp32)
    else:
        row.update(quantized_bits=32.0)
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e4 else f"{value:.2e}"


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    qlora = next((r for r in rows if r["name"] == "qlora_nf4"), None)
    lines = [f"SmolLM2-135M-Instruct, all linear layers of the body quantized, LoRA r={result['r']} on each; "
             f"held-out BBC News text ({result['eval_articles']} articles, blocks of 256 tokens); "
             f"fine-tune: {result['steps']} steps × 4 blocks, lr 3e-4, identical for every tuned row (— : not tuned). "
             f"LQ-LoRA: at most {result['iterations']} iterations per matrix, allocation grid "
             f"`{result.get('grid', 'bits')}`, empirical Fisher (per-example gradients) from {CALIBRATION_BATCHES} "
             "batches of 4. Bits: per quantized weight, scales included; the low-rank part (16-bit L1, L2) is "
             "listed apart. "
             f"Measured on {result['device']}, load average {' '.join(result.get('loadavg', []))}.", "",
             "| variant | bits/param (quantized) | + low-rank | bytes held (of fp32) | ppl at init | "
             "ppl after fine-tune | ratio to QLoRA (tuned) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        held = f"{r['bytes'] / 1e6:.1f} MB ({r['bytes'] / r['fp32_bytes']:.3f})" if "bytes" in r else "—"
        low = f"{r['low_rank_bits']:.3f}" if "low_rank_bits" in r else "—"
        tuned = r["ppl_tuned"] is not None
        ratio = f"{r['ppl_tuned'] / qlora['ppl_tuned']:.3f}" if qlora and tuned else "—"
        after = ppl(r["ppl_tuned"]) if tuned else "—"
        lines.append(f"| {r['name']} | {r['quantized_bits']:.3f} | {low} | {held} | {ppl(r['ppl_init'])} | "
                     f"{after} | {ratio} |")
    hist = [f"{r['name']}: " + ", ".join(f"{b}-bit ×{n}" for b, n in r["bits_histogram"].items() if n)
            for r in rows if "bits_histogram" in r]
    if hist:
        lines += ["", "Matrices per bit width chosen by the ILP: " + "; ".join(hist) + "."]
    if qlora and qlora["ppl_tuned"]:
        close = sorted(r["quantized_bits"] for r in rows if r["name"].startswith("lq_lora_fisher")
                       and r["ppl_tuned"] and r["ppl_tuned"] <= 1.01 * qlora["ppl_tuned"])
        lines += ["", "Lowest budget at which fine-tuned Fisher LQ-LoRA is within 1% of QLoRA-NF4's perplexity: "
                  + (f"**{close[0]:.3f} bits**." if close else "none of the budgets run.")]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any]) -> None:
    """Perplexity against total bits per parameter (quantized + low-rank), at init and after the fine-tune."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    refs = {r["name"]: r for r in result["rows"]}
    for fisher, marker in ((True, "o"), (False, "s")):
        rows = sorted((r for r in result["rows"] if r["name"].startswith("lq_lora")
                       and ("fisher" in r["name"]) == fisher), key=lambda r: r["quantized_bits"])
        if not rows:
            continue
        bits = [r["quantized_bits"] + r["low_rank_bits"] for r in rows]
        label = "LQ-LoRA" + (" (Fisher)" if fisher else "")
        ax.plot(bits, [r["ppl_init"] for r in rows], marker=marker, ls="-", label=f"{label}, at init")
        tuned = [(b, r["ppl_tuned"]) for b, r in zip(bits, rows, strict=True) if r.get("ppl_tuned")]
        if tuned:
            ax.plot(*zip(*tuned, strict=True), marker=marker, ls="none", ms=9, mfc="none",
                    label=f"{label}, fine-tuned")
    nf4 = refs["qlora_nf4"]
    ax.plot([nf4["quantized_bits"]], [nf4["ppl_init"]], "k^", label="QLoRA NF4, at init")
    ax.plot([nf4["quantized_bits"]], [nf4["ppl_tuned"]], "k^", mfc="none", ms=9, label="QLoRA NF4, fine-tuned")
    ax.axhline(refs["fp32"]["ppl_init"], color="gray", ls="--", label="fp32 base")
    ax.set(yscale="log", ylim=(20, 500), xlabel="bits per parameter (quantized + low-rank)", ylabel="perplexity",
           title="SmolLM2-135M, held-out BBC text")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "quantization.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tune", default="fp32,qlora_nf4," + ",".join(f"lq_lora_fisher_{b}" for b in BUDGETS),
                        help="the variants to fine-tune (the others are evaluated at initialisation only)")
    parser.add_argument("--eval-articles", type=int, default=16)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--grid", default="bits_blocks", choices=("paper", "bits_blocks", "bits"),
                        help="adapter.allocation_grid (paper: 36 decompositions per matrix; bits_blocks: 12)")
    parser.add_argument("--plain", action="store_true", help="also LQ-LoRA without the Fisher")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the saved JSON")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / "quantization.json").read_text()))
        return
    result: dict[str, Any] = {"steps": args.steps, "eval_articles": args.eval_articles, "r": args.r,
                              "iterations": args.iterations, "grid": args.grid, "rows": [],
                              "device": "CPU (2 cores, shared), fp32"}
    lq = ["adapter=lq_lora", f"adapter.iterations={args.iterations}",
          f"adapter.calibration_batches={CALIBRATION_BATCHES}", f"adapter.allocation_grid={args.grid}"]
    plan = [("fp32", ["adapter=lora"]), ("qlora_nf4", ["adapter=qlora"])]
    plan += [(f"lq_lora_fisher_{b}", [*lq, "adapter.fisher=true", f"adapter.budget_bits={b}"]) for b in BUDGETS]
    if args.plain:
        plan += [(f"lq_lora_{b}", [*lq, "adapter.fisher=false", f"adapter.budget_bits={b}"]) for b in BUDGETS]
    tune = set(args.tune.split(","))
    order = sorted(plan, key=lambda p: p[0] not in tune)  # tuned rows first
    for name, overrides in order:
        result["rows"].append(variant(name, args, name in tune, *overrides))
        result["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
        atomic_write_json(RESULTS / "quantization.json", result)
        atomic_write_text(RESULTS / "quantization.md", markdown(result))
        print(markdown(result), flush=True)
    plot(result)


if __name__ == "__main__":
    main()
