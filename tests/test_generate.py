"""Generation and chat from a trained run: the same greedy tokens from the run folder, its peft export
and its merged export; a chat whose second turn is generated from the first."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from petuner.export import export
from petuner.generate import Sampling, chat, generate_file, load_generator, read_prompts

PROMPTS = ["Hello, who are you?", "What is the capital of France?", "Tell me a joke", "hi"]
GREEDY = Sampling(max_new_tokens=12)


@pytest.fixture(scope="module")
def exports(varied_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return {"run": varied_run, "peft": export(varied_run, "peft", out / "peft"),
            "merged": export(varied_run, "merged", out / "merged")}


def new_tokens(path: Path) -> torch.Tensor:
    gen = load_generator(path)
    return gen.generate_ids(gen.encode([gen.messages_text([{"role": "user", "content": p}]) for p in PROMPTS]),
                            GREEDY)


def test_greedy_tokens_are_identical_from_run_peft_and_merged(exports) -> None:
    tokens = {name: new_tokens(path) for name, path in exports.items()}
    assert tokens["run"].shape == (len(PROMPTS), GREEDY.max_new_tokens)
    assert len(set(tokens["run"].flatten().tolist())) > 20  # varied text, not one repeated token
    assert torch.equal(tokens["run"], tokens["peft"])
    assert torch.equal(tokens["run"], tokens["merged"])


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(varied_run) -> None:
    gen = load_generator(varied_run)
    assert gen.answer(PROMPTS, GREEDY) == [gen.answer([p], GREEDY)[0] for p in PROMPTS]


def test_prompts_use_the_chat_template_as_training_did(varied_run) -> None:
    from petuner.data.sft import render

    gen = load_generator(varied_run)
    trained = render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], gen.tokenizer, "test")
    head = trained.text[:trained.replies[0][0]]  # the training text before the reply
    assert gen.messages_text([{"role": "user", "content": "hi"}]) == head
    assert head.endswith("<|im_start|>assistant\n")


def test_sampling_is_seeded_and_differs_from_greedy(varied_run) -> None:
    gen = load_generator(varied_run)
    hot = Sampling(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=3)
    assert gen.answer(PROMPTS, hot) == gen.answer(PROMPTS, hot)
    assert gen.answer(PROMPTS, hot) != gen.answer(PROMPTS, GREEDY)


def test_generate_file_writes_one_answer_per_prompt(varied_run, tmp_path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    gen = load_generator(varied_run)
    out = tmp_path / "answers.jsonl"
    generate_file(gen, read_prompts(prompts), out, GREEDY, batch_size=3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["response"] for r in rows] == gen.answer(PROMPTS, GREEDY)


def test_chat_keeps_the_history_and_resets(varied_run, monkeypatch) -> None:
    gen = load_generator(varied_run)
    seen: list[str] = []
    original = gen.generate_ids

    def recording(batch, sampling, streamer=None, **kwargs):
        seen.append(gen.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False))
        return original(batch, sampling, streamer, **kwargs)

    monkeypatch.setattr(gen, "generate_ids", recording)
    stdout = io.StringIO()
    history = chat(gen, GREEDY, io.StringIO("Hello, who are you?\nTell me a joke\n/reset\nhi\n"), stdout)
    first_answer = gen.answer(["Hello, who are you?"], GREEDY)[0]
    assert "Hello, who are you?" in seen[1] and first_answer in seen[1]  # turn 2 sees turn 1
    assert "Hello, who are you?" not in seen[2]  # /reset forgot it
    assert history == [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": gen.answer(["hi"], GREEDY)[0]}]
    assert first_answer in stdout.getvalue() and "(history cleared)" in stdout.getvalue()


@pytest.mark.slow
def test_chat_through_a_pipe_answers_two_turns(varied_run) -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "petuner.cli", "chat", str(varied_run), "--max-new-tokens", "12"],
                          input="Hello, who are you?\nTell me a joke\n", capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    gen = load_generator(varied_run)
    first = gen.answer(["Hello, who are you?"], GREEDY)[0]
    messages = [{"role": "user", "content": "Hello, who are you?"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "Tell me a joke"}]
    second = gen.decode(gen.generate_ids(gen.encode([gen.messages_text(messages)]), GREEDY))[0]
    turns = [t.strip() for t in done.stdout.split("> ") if t.strip()]
    # The second answer is the one generated with the first turn in context.
    assert first and second and turns == [first, second]


def test_chat_ends_cleanly_on_ctrl_c_and_exit(varied_run) -> None:
    gen = load_generator(varied_run)

    class CtrlCAfterOneLine(io.StringIO):
        def readline(self, *args) -> str:
            line = super().readline(*args)
            if not line:
                raise KeyboardInterrupt
            return line

    stdout = io.StringIO()
    assert len(chat(gen, GREEDY, CtrlCAfterOneLine("hi\n"), stdout)) == 2 and stdout.getvalue().endswith("> \n")
    assert chat(gen, GREEDY, io.StringIO("/exit\nhi\n"), io.StringIO()) == []
