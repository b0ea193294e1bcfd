"""GGUF for every family the writer maps, read by a real client: each family's tiny random model (``TINY`` in
petuner/families.py, weights drawn large) trains 2 LoRA steps, exports to GGUF (f32 and q8_0), and llama.cpp
(llama-cpp-python) decodes 4 chat prompts greedily; its tokens are compared with ``petuner generate``'s (the peer,
transformers). Where transformers can read the family's GGUF back, the f32 file's logits are compared too.

Writes benchmarks/results/gguf_families.{json,md}.

    .venv/bin/python benchmarks/gguf_families.py [--tokens 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import open_dict
from transformers import AutoModelForCausalLM

from petuner.config import compose_config
from petuner.export import export
from petuner.families import tiny_random_init
from petuner.generate import Sampling, load_generator
from petuner.gguf_export import LAYOUTS
from petuner.run import run

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["What is your name?", "Tell me about Python.", "Who wrote Hamlet?", "What is the capital of France?"]
TRANSFORMERS_READS = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"}
NOTE = ("\nTokens compared position by position: after the first differing token the two decodes diverge, so a "
        "partial q8_0 figure is a late first divergence, not a per-token error rate (tiny random models have small "
        "logit margins; q8_0 rounds each 32-weight block to 8 bits). f32 must agree exactly, and does. The "
        "transformers column compares the f32 GGUF with the run's un-merged adapter (merge order: 1e-5 of logits up "
        "to ~10).\n")
TRAIN = ("model=tiny_llama", "logger=none", "data.limit=24", "data.eval_size=8", "data.max_length=64",
         "trainer.max_steps=2", "trainer.save_every=null", "trainer.batch_size=4", "optimizer.warmup_steps=0")


def llama_cpp_tokens(path: Path, prompt: list[int], n: int) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n or token == llm.token_eos():
            break
    return out


def family_row(family: str, work: Path, n: int) -> dict:
    # the GGUF's general.name starts with the run folder's name; llama.cpp reads a "phi3" in it as a real Phi-3
    # vocabulary (it looks its <|end|> token up), which the tiny models' SmolLM2 vocabulary lacks
    cfg = compose_config([*TRAIN, f"run_dir={work / family / 'run'}"])
    with open_dict(cfg):
        cfg.model.random_init = tiny_random_init(family, initializer_range=0.2)
    run(cfg)
    gen = load_generator(cfg.run_dir)
    row: dict = {"family": family, "arch": LAYOUTS[family].arch.lower()}
    batches = [gen.encode([gen.messages_text([{"role": "user", "content": p}])]) for p in PROMPTS]
    ours = [gen.generate_ids(b, Sampling(max_new_tokens=n))[0].tolist() for b in batches]
    for dtype in ("f32", "q8_0"):
        start = time.perf_counter()
        out = export(cfg.run_dir, "gguf", work / f"{family}-{dtype}.gguf", dtype=dtype)
        row[f"{dtype}_export_s"] = round(time.perf_counter() - start, 1)
        row[f"{dtype}_mib"] = round(out.stat().st_size / 2**20, 2)
        theirs = [llama_cpp_tokens(out, b["input_ids"][0].tolist(), len(o)) for b, o in zip(batches, ours, strict=True)]
        same = sum(a == b for o, t in zip(ours, theirs, strict=True) for a, b in zip(o, t, strict=False))
        row[f"{dtype}_llama_cpp_agreement"] = same / sum(len(o) for o in ours)
        if dtype == "f32" and family in TRANSFORMERS_READS:
            reloaded = AutoModelForCausalLM.from_pretrained(work, gguf_file=out.name, dtype=torch.float32).eval()
            with torch.no_grad():
                diff = (reloaded(**batches[0]).logits - gen.model(**batches[0]).logits).abs().max().item()
            row["f32_transformers_max_abs_logit_diff"] = diff
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [family_row(family, Path(work), args.tokens) for family in LAYOUTS]
    load = Path("/proc/loadavg").read_text().split()[:3]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_families.json").write_text(json.dumps({"tokens": args.tokens, "prompts": PROMPTS,
                                                            "loadavg": load, "rows": rows}, indent=2))
    lines = [f"# GGUF per family, read by llama.cpp ({len(PROMPTS)} prompts × {args.tokens} greedy tokens; "
             f"load {' '.join(load)})", "",
             "| family | llama.cpp arch | f32 MiB | f32 tokens = petuner generate | q8_0 tokens = petuner generate "
             "| transformers f32 reload max abs logit diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        diff = r.get("f32_transformers_max_abs_logit_diff")
        lines.append(f"| {r['family']} | {r['arch']} | {r['f32_mib']} | {r['f32_llama_cpp_agreement']:.3f} | "
                     f"{r['q8_0_llama_cpp_agreement']:.3f} | {'no reader' if diff is None else f'{diff:.2e}'} |")
    (RESULTS / "gguf_families.md").write_text("\n".join(lines) + "\n" + NOTE)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
