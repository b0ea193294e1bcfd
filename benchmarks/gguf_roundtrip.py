"""GGUF export fidelity: logits of each GGUF file reloaded by transformers (``gguf_file=``) against the merged
export of the same run, for f32, f16 and q8_0, plus file size and greedy-token agreement.

Inputs: the chat-formatted first 8 held-out chatterbot prompts of the run (left-padded batch). Writes
benchmarks/results/gguf_roundtrip.{json,md}.

    .venv/bin/python benchmarks/gguf_roundtrip.py RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from petuner.choices import GGUF_DTYPES
from petuner.export import export
from petuner.generate import load_generator

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["What is your name?", "Do you like music?", "Tell me about Python.", "What is AI?",
           "How are you today?", "Who wrote Hamlet?", "What is the capital of France?", "Can you help me?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    args = parser.parse_args()
    gen = load_generator(args.run_dir)
    batch = gen.encode([gen.messages_text([{"role": "user", "content": p}]) for p in PROMPTS])
    mask = batch["attention_mask"].bool()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        merged = export(args.run_dir, "merged", Path(work) / "merged")
        with torch.no_grad():
            ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(**batch).logits[mask]
        for dtype in GGUF_DTYPES:
            start = time.perf_counter()
            out = export(args.run_dir, "gguf", Path(work) / f"model-{dtype}.gguf", dtype=dtype)
            seconds = time.perf_counter() - start
            model = AutoModelForCausalLM.from_pretrained(work, gguf_file=out.name, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = model(**batch).logits[mask]
            diff = (logits - ref).abs().max().item()
            rows.append({"dtype": dtype, "bytes": out.stat().st_size, "export_s": round(seconds, 1),
                         "max_abs_logit_diff": diff, "relative_to_max_logit": diff / ref.abs().max().item(),
                         "argmax_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()})
    load = Path("/proc/loadavg").read_text().split()[:3]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_roundtrip.json").write_text(json.dumps({"run_dir": args.run_dir, "loadavg": load,
                                                             "positions": int(mask.sum()), "rows": rows}, indent=2))
    lines = [f"# GGUF round trip ({args.run_dir}; {int(mask.sum())} prompt positions; load {' '.join(load)})", "",
             "| dtype | file MiB | export s | max abs logit diff | / max logit | argmax agreement |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['bytes'] / 2**20:.1f} | {r['export_s']} | {r['max_abs_logit_diff']:.2e} | "
              f"{r['relative_to_max_logit']:.2e} | {r['argmax_agreement']:.4f} |" for r in rows]
    (RESULTS / "gguf_roundtrip.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
