"""Whole runs for every data shape, through ``petuner.run`` on the tiny models, with what each shape claims
checked after training: chat files (OpenAI ``messages``, ShareGPT, renamed columns) read into the same
conversations, a chat + text mixture evaluated per source, text runs generating
as text, packed chat data giving the unpacked loss, ``best/`` and early stopping on a maximized objective,
and the quick start's default logger (wandb, offline). The shipped ``data=mixture`` runs in
``test_data_sources.py::test_shipped_mixture_run_learns_and_logs_eval_per_source``.

Until #28/#29 (380fa9c) every ``data=chat`` and ``data=mixture`` run crashed in the objective check while
the suite passed: no completed run trained on those kinds. With that commit's petuner/ changes reverted,
the chat, mixture and packing tests here fail (KeyError: 'chat', KeyError: 'chat+text').
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from petuner.run import run
from petuner.train.logging import read_metrics

# ping i -> pong i: a pattern six steps of a tiny model learn visibly
MESSAGES = [[{"role": "user", "content": f"ping {i}"}, {"role": "assistant", "content": f"pong {i}"}]
            for i in range(48)]
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt"}
TEXT = [{"text": f"Report {i}: the market rose by {i} points as traders bought shares."} for i in range(48)]
CHAT = ("data=chat", "data.eval_size=8")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETUNER_DATA_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def losses(run_dir: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run_dir) if key in m]


def check_learned(info: dict, kind: str) -> None:
    results = info["results"]
    assert info["data_kind"] == kind and info["steps"] == 6
    assert math.isfinite(results["eval/loss_after"]) and results["eval/loss_after"] < results["eval/loss_before"]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished data=chat run on OpenAI ``messages`` rows: the reference the other chat forms must match."""
    from tests.conftest import make_cfg

    tmp = tmp_path_factory.mktemp("chat")
    path = write_jsonl(tmp / "chats.jsonl", [{"messages": m} for m in MESSAGES])
    info = run(make_cfg(tmp / "run", *CHAT, f"data.path={path}"))
    check_learned(info, "chat")
    return tmp / "run"


@pytest.mark.parametrize("form", ["sharegpt", "renamed_column"])
def test_chat_forms_train_exactly_as_messages(chat_run, cfg_factory, tmp_path, form) -> None:
    """ShareGPT rows (data=chat) and a renamed messages column (data=hf, data.columns) are read into the same
    conversations: the same examples, the same labelled tokens, hence the same losses at every step."""
    if form == "sharegpt":
        rows = [{"conversations": [{"from": SHAREGPT_ROLES[t["role"]], "value": t["content"]} for t in m]}
                for m in MESSAGES]
        overrides = CHAT
    else:
        rows = [{"dialog": m} for m in MESSAGES]
        overrides = ("data=hf", "data.eval_size=8", "data.columns={messages: dialog}")
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    info = run(cfg_factory(*overrides, f"data.path={path}"))
    check_learned(info, "chat")
    reference = json.loads((chat_run / "run.json").read_text())
    for split in ("train", "eval"):
        ours, theirs = info["data"]["sources"], reference["data"]["sources"]
        assert next(iter(ours.values()))[split] == next(iter(theirs.values()))[split], split
    for key in ("train/loss", "eval/loss"):
        assert losses(tmp_path / "run", key) == losses(chat_run, key), key


def test_packed_chat_gives_the_unpacked_loss(chat_run, cfg_factory, tmp_path) -> None:
    """data.packing=true on chat data: fewer, fuller rows, the same held-out loss before training (each
    example attends only to itself, positions restart), and it trains."""
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in MESSAGES])
    info = run(cfg_factory(*CHAT, f"data.path={path}", "data.packing=true", "data.max_length=256"))
    check_learned(info, "chat")
    unpacked = json.loads((chat_run / "run.json").read_text())
    assert info["train_examples"] == unpacked["train_examples"]  # examples stay examples (#29) ...
    assert info["train_rows"] < unpacked["train_examples"] // 4  # ... packed into rows of 256 tokens, ~7 a row
    # measured difference 9.5e-7 (float32 sums in another order); with attention not confined to each example
    # (attend_within_examples a no-op, planted) it is 4.0e-3 and this fails
    assert info["results"]["eval/loss_before"] == pytest.approx(unpacked["results"]["eval/loss_before"], abs=1e-5)


def test_chat_and_text_mixture_trains_and_evaluates_per_source(cfg_factory, tmp_path) -> None:
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in MESSAGES])
    prose = write_jsonl(tmp_path / "prose.jsonl", TEXT)
    sources = (f"data.sources=[{{name: chats, path: '{chats}', kind: chat}},"
               f"{{name: prose, path: '{prose}', kind: text, eval_size: 8}}]")
    info = run(cfg_factory("data=mixture", sources, "data.eval_size=8"))
    check_learned(info, "chat+text")
    assert {s["kind"] for s in info["data"]["sources"].values()} == {"chat", "text"}
    results = info["results"]
    for name in ("chats", "prose"):
        assert results[f"eval/{name}/loss_after"] < results[f"eval/{name}/loss_before"], name


def test_text_run_generates_from_raw_text(cfg_factory, tmp_path) -> None:
    """data=bbc_text trains on every token; its run folder generates by continuing the raw prompt (no chat
    template): the generator's new tokens are the loaded model's own greedy continuation of the prompt."""
    from petuner.generate import Sampling, load_generator

    info = run(cfg_factory("data=bbc_text", "data.eval_size=8", "+model.random_init.initializer_range=0.2"))
    check_learned(info, "text")
    gen = load_generator(tmp_path / "run")
    prompt = "Shares in the company rose"
    assert not gen.chat_format and gen.messages_text([{"role": "user", "content": prompt}]) == prompt
    new = gen.generate_ids(gen.encode([prompt]), Sampling(max_new_tokens=8))[0]
    ids = gen.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        for token in new.tolist():
            assert gen.model(input_ids=ids).logits[0, -1].argmax().item() == token
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert len(set(new.tolist())) > 1  # a continuation that depends on the prompt, not one repeated token


def test_best_and_early_stopping_maximize_accuracy(cfg_factory, tmp_path) -> None:
    """objective=eval/accuracy (classification): best/ holds the highest-accuracy evaluation (the first one
    reaching it), and the run stops after `patience` evaluations without a higher one."""
    info = run(cfg_factory("model=tiny_bert", "data=bbc_news", "data.eval_size=16", "objective=eval/accuracy",
                           "trainer.max_steps=30", "trainer.eval_every=1", "trainer.early_stopping_patience=3",
                           "trainer.save_every=1", "trainer.keep_checkpoints=100"))
    run_dir = tmp_path / "run"
    evals = [m for m in read_metrics(run_dir) if "eval/accuracy" in m]
    accuracy = {m["step"]: m["eval/accuracy"] for m in evals}
    loss = {m["step"]: m["eval/loss"] for m in evals}
    best_step = max(accuracy, key=lambda s: (accuracy[s], -s))
    # In this run accuracy peaks (0.125 -> 0.3125) at step 1 while the loss still falls to step 4: minimizing,
    # or following the loss, would pick another step. Seen to fail with DIRECTIONS["eval/accuracy"] = "minimize".
    assert min(accuracy.values()) < accuracy[best_step] and best_step != min(loss, key=loss.get)
    assert info["results"]["early_stopping/step"] == best_step + 3 == max(accuracy) < 30
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["step"] == best_step and best["eval/accuracy"] == accuracy[best_step]
    saved = load_file(run_dir / "best" / "adapter.safetensors")
    at_best = load_file(run_dir / "checkpoints" / f"step-{best_step:08d}" / "adapter.safetensors")
    assert saved.keys() == at_best.keys() and all(torch.equal(saved[k], at_best[k]) for k in saved)


def test_default_wandb_logger_writes_an_offline_run(cfg_factory, tmp_path, monkeypatch) -> None:
    """The quick start's run: logger=wandb (the default), offline, no account. The offline run file holds every
    loss petuner logged. (wandb 0.31 reads its run files in Go only, so the values are found as the JSON that
    wandb stores for each history item, e.g. b"10.888823509216309".)"""
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables wandb for every other test
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(cfg_factory("logger=wandb"))
    run_dir = tmp_path / "run"
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    stored = run_file.read_bytes()
    logged = [m[k] for m in read_metrics(run_dir) for k in ("train/loss", "eval/loss") if k in m]
    assert len(logged) == 8 and all(json.dumps(value).encode() in stored for value in logged)
