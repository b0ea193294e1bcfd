"""Generate from a trained run: batched prompts (``petuner generate``) and a streamed chat (``petuner chat``).

Works on everything ``petuner.load`` loads: run folders, peft exports and merged exports. A prompt is
formatted the way training formatted it (``petuner.data.sft.format_pair``): through the tokenizer's
chat template when it has one (the run's ``data.system_prompt`` included), else petuner's fallback
template, tokenized without extra special tokens; runs trained on plain text (``data.kind=text``) take
the prompt as it is. Batches are left-padded, so every row's answer starts right after its prompt.
Decoding is transformers' ``generate``: greedy unless a ``temperature`` is set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from petuner.data.sft import FALLBACK_TEMPLATE
from petuner.errors import PetunerError
from petuner.io import atomic_write_text, json_lines


@dataclass
class Sampling:
    """Decoding settings; ``temperature=0`` is greedy (the default)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise PetunerError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise PetunerError(f"--temperature {self.temperature}: must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise PetunerError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.temperature == 0 and (self.top_p != 1 or self.seed != 0):
            raise PetunerError("--top-p and --seed shape sampling: set --temperature > 0 (0 is greedy decoding)")


@dataclass
class Generator:
    """A loaded model and how its prompts are written."""

    model: Any
    tokenizer: Any
    chat_format: bool  # chat template / fallback template (sft runs), or raw text (text runs)
    system_prompt: str | None = None
    # several runs on one base (petuner.multi_adapter): the adapter names a row can pick, and chat's current one
    adapters: tuple[str, ...] = ()
    active: str | None = None

    def messages_text(self, messages: list[dict[str, str]]) -> str:
        """A conversation ending in a user turn, rendered with the assistant's header after it."""
        if not self.chat_format:
            return "\n".join(m["content"] for m in messages if m["role"] != "system")
        # the template training rendered with: the tokenizer's own, or petuner's fallback (as petuner.data.sft)
        template = None if getattr(self.tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return self.tokenizer.apply_chat_template([*system, *messages], chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "left"
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)  # as training did

    def generate_ids(self, batch: dict[str, torch.Tensor], sampling: Sampling, streamer: Any = None,
                     adapter_names: list[str] | None = None) -> torch.Tensor:
        """New token ids per row (prompt cut off; padding after an early end of sequence left in); with several
        adapters loaded, ``adapter_names`` picks each row's (peft's mixed batch), else the active one."""
        from transformers import GenerationConfig

        sample = sampling.temperature > 0
        config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=sample,
                                  temperature=sampling.temperature if sample else None,
                                  top_p=sampling.top_p if sample else None, top_k=None,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._eos_ids())
        if self.adapters and adapter_names is None:
            adapter_names = [self.active or self.adapters[0]] * batch["input_ids"].shape[0]
        # "base": no adapter, which peft's mixed batch calls "__base__"
        routed = {"adapter_names": ["__base__" if n == "base" else n for n in adapter_names]} if self.adapters else {}
        torch.manual_seed(sampling.seed)
        with torch.no_grad():
            out = self.model.generate(**batch, generation_config=config, streamer=streamer, **routed)
        return out[:, batch["input_ids"].shape[1]:]

    def _eos_ids(self) -> list[int]:
        config_eos = getattr(getattr(self.model, "config", None), "eos_token_id", None)
        ids = [self.tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])]
        return sorted({i for i in ids if i is not None})

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def answer(self, prompts: list[str], sampling: Sampling, adapter_names: list[str] | None = None) -> list[str]:
        texts = [self.messages_text([{"role": "user", "content": p}]) for p in prompts]
        return self.decode(self.generate_ids(self.encode(texts), sampling, adapter_names=adapter_names))


def load_generator(path: Path | str, *, checkpoint: str | None = None, trust_remote_code: bool = False) -> Generator:
    """A run folder or export, ready to generate; a classification model is one line, before loading it."""
    import petuner
    from petuner.manifest import read_manifest
    from petuner.run_folder import folder_task, read_config

    path = Path(path)
    task = folder_task(path)
    if task != "causal_lm":
        raise PetunerError(f"{path} is a {task} model (it classifies, it does not write text): "
                           "generate and chat need a causal_lm run")
    manifest = read_manifest(path) or {}
    is_export = str(manifest.get("kind", "")).startswith("export-")
    if is_export and checkpoint not in (None, "last"):
        raise PetunerError(f"--checkpoint {checkpoint}: {path} is an export, which holds one set of weights")
    kwargs = {} if is_export else {"checkpoint": checkpoint}
    model, tokenizer = petuner.load(path, trust_remote_code=trust_remote_code, **kwargs)
    if is_export:
        kind, system_prompt = manifest.get("data_kind", "sft"), manifest.get("system_prompt")
    else:
        cfg = read_config(path)
        kind = json.loads((path / "run.json").read_text()).get("data_kind", "sft")
        system_prompt = cfg.data.get("system_prompt")
    return Generator(model, tokenizer, chat_format=kind != "text", system_prompt=system_prompt)


def read_prompts(path: Path) -> list[str]:
    """``--file``: one JSON object with a ``prompt`` per line (or a bare JSON string)."""
    return [prompt for prompt, _ in prompt_rows(path)]


def prompt_rows(path: Path) -> list[tuple[str, str | None]]:
    """``--file``'s (prompt, adapter) rows: an optional ``"adapter"`` names the run that answers it."""
    if not path.is_file():
        raise PetunerError(f"--file {path} does not exist")
    rows = []
    for number, row in json_lines(path):
        prompt = row.get("prompt") if isinstance(row, dict) else row
        adapter = row.get("adapter") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not isinstance(adapter, str | None):
            raise PetunerError(f"{path}:{number}: expected {{\"prompt\": \"...\"}} (with an optional "
                               "\"adapter\": \"NAME\") or a JSON string")
        rows.append((prompt, adapter))
    if not rows:
        raise PetunerError(f"--file {path} holds no prompts")
    return rows


def generate_file(gen: Generator, prompts: list[str], out: Path, sampling: Sampling, batch_size: int,
                  adapter_names: list[str] | None = None) -> None:
    """Answer every prompt in batches (row by row through ``adapter_names`` where given); ``out`` (JSONL: prompt,
    response, and the adapter where several are loaded) appears only once complete."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        names = adapter_names[start:start + batch_size] if adapter_names else None
        answers += gen.answer(prompts[start:start + batch_size], sampling, adapter_names=names)
    rows = [{"prompt": p, "response": a} for p, a in zip(prompts, answers, strict=True)]
    for row, name in zip(rows, adapter_names or [], strict=False):
        row["adapter"] = name
    atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows))


def chat(gen: Generator, sampling: Sampling, stdin: TextIO, stdout: TextIO) -> list[dict[str, str]]:
    """The chat loop: each answer streamed as it is generated, the history kept between turns.

    ``/reset`` clears the history, ``/use NAME`` switches adapter (several loaded), ``/exit``, end of input or
    Ctrl-C leave. Returns the history.
    """
    from transformers import TextStreamer

    class Streamer(TextStreamer):  # TextStreamer prints to sys.stdout; write where we were told to
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stdout.write(text + ("\n" if stream_end else ""))
            stdout.flush()

    history: list[dict[str, str]] = []
    try:
        for line in _lines(stdin, stdout):
            if line == "/exit":
                break
            if line == "/reset":
                history = []
                stdout.write("(history cleared)\n")
                continue
            if line.startswith("/use "):
                stdout.write(_use(gen, line.removeprefix("/use ").strip()) + "\n")
                continue
            history.append({"role": "user", "content": line})
            batch = gen.encode([gen.messages_text(history)])
            streamer = Streamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
            ids = gen.generate_ids(batch, sampling, streamer=streamer)
            history.append({"role": "assistant", "content": gen.decode(ids)[0]})
    except KeyboardInterrupt:  # Ctrl-C, at the prompt or mid-answer: leave cleanly
        stdout.write("\n")
    return history


def _use(gen: Generator, name: str) -> str:
    """Chat's ``/use NAME``: answer with that adapter from now on."""
    if name not in gen.adapters:
        return f"(no adapter {name!r}; loaded: {', '.join(gen.adapters) or 'one run only'})"
    gen.active = name
    return f"(answering with {name})"


def _lines(stdin: TextIO, stdout: TextIO) -> Iterator[str]:
    """Non-empty input lines after a ``> `` prompt, until end of input."""
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return
        if line.strip():
            yield line.strip()
