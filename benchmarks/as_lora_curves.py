"""Rank-vs-error curves of ``petuner export --as-lora``: how much of a non-LoRA method's update a plain LoRA of
rank R keeps, and what that does to the logits once peft reloads the conversion.

For each run: the relative Frobenius error ‖ΔW − ΔW_R‖ / ‖ΔW‖ over all adapted matrices at every rank R (read
off each matrix's singular values: what as_lora.json reports), and at a few ranks the export itself reloaded by
peft over the base: its reported error, max |logit difference| / max |logit| and next-token (argmax) agreement
against the unconverted run, on the chat-formatted prompts below. Writes
benchmarks/results/as_lora_curves.{json,md,png}.

    .venv/bin/python benchmarks/as_lora_curves.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--ranks 4 16 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from petuner.adapters import adapter_layers
from petuner.export import export
from petuner.generate import load_generator
from petuner.models import load_model
from petuner.run_folder import read_config

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["What is your name?", "Do you like music?", "Tell me about Python.", "What is AI?"]


@torch.no_grad()
def curve(model: torch.nn.Module) -> list[float]:
    """Overall relative error at rank R = 0, 1, 2, ... (up to the largest matrix's full rank)."""
    spectra = [torch.linalg.svdvals(layer.weight_update().double()) for _, layer in adapter_layers(model)]
    longest = max(s.numel() for s in spectra)
    tails = torch.zeros(longest + 1, dtype=torch.float64)
    for s in spectra:
        energy = s ** 2
        tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # Σ_{i ≥ R} s_i²
        tails[: s.numel()] += tail
    return (tails / tails[0]).sqrt().tolist()


def checked_ranks(run_dir: str, gen, batch, mask, ranks: list[int], work: Path) -> list[dict]:
    """The export at each rank, reloaded by peft: reported error, logit difference, argmax agreement."""
    with torch.no_grad():
        ref = gen.model(**batch).logits[mask]
    rows = []
    for rank in ranks:
        out = export(run_dir, "peft", work / f"r{rank}", as_lora=True, rank=rank, force=True)
        report = json.loads((out / "as_lora.json").read_text())
        base = load_model(read_config(run_dir).model)
        with torch.no_grad():
            logits = PeftModel.from_pretrained(base, str(out)).eval()(**batch).logits[mask]
        rows.append({"rank": rank, "reported_relative_error": report["overall_relative_error"],
                     "logit_diff_relative": ((logits - ref).abs().max() / ref.abs().max()).item(),
                     "argmax_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()})
    return rows


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(range(1, len(values)), values[1:], label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank R of the plain LoRA")
    ax.set_ylabel("relative error ‖ΔW − ΔW_R‖ / ‖ΔW‖")
    ax.set_title("--as-lora: what rank R keeps (SmolLM2-135M runs)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args()
    curves, checks = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for spec in args.runs:
            name, run_dir = spec.split("=", 1)
            gen = load_generator(run_dir)
            batch = gen.encode([gen.messages_text([{"role": "user", "content": p}]) for p in PROMPTS])
            curves[name] = curve(gen.model)
            checks[name] = checked_ranks(run_dir, gen, batch, batch["attention_mask"].bool(), args.ranks, Path(work))
    load = Path("/proc/loadavg").read_text().split()[:3]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "as_lora_curves.json").write_text(json.dumps({"runs": args.runs, "loadavg": load, "curves": curves,
                                                             "checks": checks}, indent=2))
    plot(curves, RESULTS / "as_lora_curves.png")
    shown = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if all(r < len(c) for c in curves.values())]
    lines = ["# --as-lora: relative error of the rank-R plain LoRA, over all adapted matrices", "",
             "| method | " + " | ".join(f"R={r}" for r in shown) + " |", "|---|" + "---|" * len(shown)]
    lines += [f"| {n} | " + " | ".join(f"{c[r]:.3f}" for r in shown) + " |" for n, c in curves.items()]
    lines += ["", "The export reloaded by peft, against the unconverted run (chat prompts, every position):", "",
              "| method | rank | reported error | max logit diff / max logit | argmax agreement |",
              "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['rank']} | {r['reported_relative_error']:.3f} | {r['logit_diff_relative']:.2e} | "
              f"{r['argmax_agreement']:.3f} |" for n, rows in checks.items() for r in rows]
    (RESULTS / "as_lora_curves.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
