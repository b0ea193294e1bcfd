"""A real engine: llama.cpp (llama-cpp-python) serving a run as the merged GGUF, and as the LoRA GGUF over the
base's GGUF, against ``petuner generate``'s greedy tokens on the same prompts (same prompt token ids).

Per variant: how many prompts give exactly petuner's greedy continuation, the share of positions that agree
before the first difference, and llama.cpp's generation speed. Writes benchmarks/results/llama_cpp.{json,md}.

    .venv/bin/python benchmarks/llama_cpp_check.py RUN_DIR [--new-tokens 16] [--dtype f32]

(Not named llama_cpp.py: run as a script, that name would shadow the llama_cpp package.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import llama_cpp

from petuner.export import export
from petuner.generate import Sampling, load_generator
from petuner.gguf_export import write_gguf
from petuner.models import load_model
from petuner.run_folder import read_config

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["What is your name?", "Do you like music?", "Tell me about Python.", "What is AI?",
           "How are you today?", "Who wrote Hamlet?", "What is the capital of France?", "Can you help me?"]


def greedy(model_path: Path, prompt: list[int], new_tokens: int, lora: Path | None = None) -> tuple[list[int], float]:
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=512, n_threads=2, verbose=False,
                          **({"lora_path": str(lora)} if lora else {}))
    out, start = [], time.perf_counter()
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(out) == new_tokens:
            break
        out.append(token)
    return out, time.perf_counter() - start


def agreement(ours: list[int], theirs: list[int]) -> int:
    """Positions equal before the first difference."""
    same = 0
    for a, b in zip(ours, theirs, strict=False):
        if a != b:
            break
        same += 1
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="f32", choices=("f32", "f16"))
    args = parser.parse_args()
    gen = load_generator(args.run_dir)
    prompts, expected = [], []
    for text in PROMPTS:
        batch = gen.encode([gen.messages_text([{"role": "user", "content": text}])])
        prompts.append(batch["input_ids"][0].tolist())
        ids = gen.generate_ids(batch, Sampling(max_new_tokens=args.new_tokens))[0].tolist()
        eos = set(gen._eos_ids())
        expected.append(ids[: next((k for k, i in enumerate(ids) if i in eos), len(ids))])
    rows = []
    with tempfile.TemporaryDirectory() as work:
        merged = export(args.run_dir, "gguf", Path(work) / "merged.gguf", dtype=args.dtype)
        lora = export(args.run_dir, "gguf-lora", Path(work) / "adapter.gguf")
        base = Path(work) / "base.gguf"
        write_gguf(load_model(read_config(args.run_dir).model), gen.tokenizer, base, args.dtype, name="base")
        for variant, model, adapter in (("merged GGUF", merged, None), ("base GGUF + LoRA GGUF", base, lora),
                                        ("base GGUF alone (control)", base, None)):
            got = [greedy(model, p, args.new_tokens, adapter) for p in prompts]
            pairs = [(t, e) for (t, _), e in zip(got, expected, strict=True)]
            rows.append({"variant": variant, "exact_prompts": sum(t == e for t, e in pairs),
                         "agreeing_positions": sum(agreement(e, t) for t, e in pairs),
                         "positions": sum(len(e) for e in expected),
                         "tokens_per_s": sum(len(t) for t, _ in got) / sum(s for _, s in got)})
    load = Path("/proc/loadavg").read_text().split()[:3]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llama_cpp.json").write_text(json.dumps({"run_dir": args.run_dir, "args": vars(args), "loadavg": load,
                                                        "llama_cpp_python": llama_cpp.__version__, "rows": rows},
                                                       indent=2))
    lines = [f"# llama.cpp (llama-cpp-python {llama_cpp.__version__}) vs petuner generate, greedy, "
             f"{len(PROMPTS)} chat prompts x {args.new_tokens} tokens, {args.dtype} ({args.run_dir}; load "
             f"{' '.join(load)})", "",
             "| variant | prompts identical | positions agreeing before a difference | llama.cpp tokens/s |",
             "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['exact_prompts']}/{len(PROMPTS)} | {r['agreeing_positions']}/{r['positions']} | "
              f"{r['tokens_per_s']:.1f} |" for r in rows]
    lines += ["", f"Command: `.venv/bin/python benchmarks/llama_cpp_check.py {args.run_dir} "
              f"--new-tokens {args.new_tokens} --dtype {args.dtype}`"]
    (RESULTS / "llama_cpp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
