"""A real engine: llama.cpp (llama-cpp-python) loads the merged GGUF, and the LoRA GGUF over the base's GGUF, and
its greedy tokens match petuner generate's on the same prompts. Skips only where llama_cpp is not installed."""

from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

PROMPTS = ["What is your name?", "Tell me about Python.", "Who wrote Hamlet?"]
NEW_TOKENS = 8


def llama_tokens(model_path, prompt_ids: list[int], lora_path=None) -> list[int]:
    """llama.cpp's greedy continuation of ``prompt_ids`` (f32 weights, one thread: deterministic)."""
    kwargs = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=256, n_threads=1, verbose=False, **kwargs)
    out = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(out) == NEW_TOKENS:
            break
        out.append(token)
    return out


@pytest.mark.slow
def test_llama_cpp_serves_merged_and_lora_gguf_with_petuner_greedy_tokens(varied_run, tmp_path) -> None:
    from petuner.export import export
    from petuner.generate import Sampling, load_generator
    from petuner.gguf_export import write_gguf
    from petuner.models import load_model
    from petuner.run_folder import read_config

    gen = load_generator(varied_run)
    expected, prompts = [], []
    for prompt in PROMPTS:
        batch = gen.encode([gen.messages_text([{"role": "user", "content": prompt}])])
        prompts.append(batch["input_ids"][0].tolist())
        ids = gen.generate_ids(batch, Sampling(max_new_tokens=NEW_TOKENS))[0].tolist()
        expected.append([i for i in ids if i != gen.tokenizer.pad_token_id][:NEW_TOKENS])
    assert len({tuple(e) for e in expected}) > 1  # the prompts are told apart: the comparison bites
    merged = export(varied_run, "gguf", tmp_path / "merged.gguf", dtype="f32")
    lora = export(varied_run, "gguf-lora", tmp_path / "adapter.gguf")
    base = tmp_path / "base.gguf"
    write_gguf(load_model(read_config(varied_run).model), gen.tokenizer, base, "f32", name="base")
    for ids, want in zip(prompts, expected, strict=True):
        assert llama_tokens(merged, ids) == want
        assert llama_tokens(base, ids, lora_path=lora) == want
    # the adapter changes the base's answer somewhere: the LoRA GGUF is really applied
    assert any(llama_tokens(base, ids) != want for ids, want in zip(prompts, expected, strict=True))
