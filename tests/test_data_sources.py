"""Bring your own data: local files through data=hf with data.columns, the tokenization cache, mixtures,
`petuner data`, and bad input as one line with exit status 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

import petuner.data.sft as sft
from petuner.cli import main as petuner_main
from petuner.config import compose_config
from petuner.data import build_data
from petuner.data.mixture import mix
from petuner.models import load_tokenizer
from petuner.run import run
from tests.conftest import TINY

QA = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.", "id": i} for i in range(40)]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PETUNER_DATA_CACHE", str(cache))
    return cache


@pytest.fixture
def map_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the conversations tokenized (the work a cache hit skips)."""
    calls: list[int] = []
    real = sft.tokenize

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "tokenize", counting)
    return calls


def write(path: Path, rows: list[dict]) -> Path:
    table = Dataset.from_list(rows)
    {".csv": table.to_csv, ".parquet": table.to_parquet, ".jsonl": table.to_json}[path.suffix](str(path))
    return path


def tiny(tmp_path: Path, *overrides: str):
    return compose_config([*TINY, f"run_dir={tmp_path / 'run'}", "trainer.max_steps=2", "data.eval_size=8",
                           *overrides])


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_local_files_train_through_hf_with_columns_and_a_cache(tmp_path, private_cache, map_calls, suffix) -> None:
    path = write(tmp_path / f"qa{suffix}", QA)
    cfg = tiny(tmp_path, "data=hf", f"data.path={path}", "data.columns={prompt: question, response: answer}")
    info = run(cfg)
    assert info["data_kind"] == "sft" and info["train_examples"] == 32 and info["eval_examples"] == 8
    assert info["data"]["sources"]["hf"]["train"]["truncated"] == 0 and np.isfinite(info["results"]["eval/loss_after"])
    assert len(map_calls) == 40
    assert len(list(private_cache.glob("sft-*.arrow"))) == 2  # train and eval
    tokenizer = load_tokenizer(cfg.model)
    first = build_data(cfg.data, tokenizer, "causal_lm")
    again = build_data(cfg.data, tokenizer, "causal_lm")
    assert len(map_calls) == 40  # no map work: both splits came from the cache files
    assert first.train["labels"] == again.train["labels"] and first.eval["input_ids"] == again.eval["input_ids"]
    cfg.data.max_length = 48  # a setting that changes the result: tokenized again, under another key
    build_data(cfg.data, tokenizer, "causal_lm")
    assert len(map_calls) == 80 and len(list(private_cache.glob("sft-*.arrow"))) == 4


def test_mixture_counts_follow_the_weights_and_the_seed() -> None:
    a = Dataset.from_dict({"input_ids": [[1, 1]] * 300_000})
    b = Dataset.from_dict({"input_ids": [[2, 2]] * 300_000})
    for seed in range(2):
        mixed, counts = mix([a, b], [3.0, 1.0], "interleave", "first_exhausted", seed)
        assert abs(counts[0] / counts[1] / 3 - 1) < 0.01 and counts[0] == len(a)
        again, same = mix([a, b], [3.0, 1.0], "interleave", "first_exhausted", seed)
        assert same == counts and again[:2000]["input_ids"] == mixed[:2000]["input_ids"]
    small = a.select(range(1000))
    _, counts = mix([small, b.select(range(1000))], [3.0, 1.0], "concat", "first_exhausted", 0)
    assert counts == [3000, 1000]
    _, counts = mix([small, b.select(range(1000))], [1.5, 0.25], "concat", "first_exhausted", 0)
    assert counts == [1500, 250]


def test_two_sources_end_to_end_with_per_source_eval(tmp_path) -> None:
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
             for i in range(60)]
    write(tmp_path / "chats.jsonl", chats)
    write(tmp_path / "qa.csv", QA)
    sources = (f"data.sources=[{{path:'{tmp_path / 'chats.jsonl'}',weight:3}},"
               f"{{name:qa,path:'{tmp_path / 'qa.csv'}',columns:{{prompt:question,response:answer}}}}]")
    info = run(tiny(tmp_path, "data=mixture", sources, "data.eval_size=4", "data.mix=concat"))
    report = info["data"]["sources"]
    assert [report["chats"]["mixed_train_examples"], report["qa"]["mixed_train_examples"]] == [3 * 56, 36]
    assert info["data_kind"] == "chat+sft" and info["train_examples"] == 3 * 56 + 36 and info["eval_examples"] == 8
    assert [report[n]["eval"]["examples"] for n in ("chats", "qa")] == [4, 4]
    results = info["results"]
    assert info["steps"] == 2 and all(np.isfinite(results[f"eval/{n}/loss_after"]) for n in ("chats", "qa"))


def test_shipped_mixture_run_learns_and_logs_eval_per_source(tmp_path, caplog) -> None:
    """data=mixture as shipped: chatterbot pairs 3:1 with BBC text (kinds sft+text), each source's held-out
    loss logged and falling, the combined eval loss their token-weighted mean. (It crashed in every run
    before 380fa9c; this test then failed with KeyError: 'sft+text'.)"""
    caplog.set_level("INFO", logger="petuner.run")
    info = run(tiny(tmp_path, "data=mixture", "data.limit=16", "trainer.max_steps=6"))
    sources = info["data"]["sources"]
    assert info["data_kind"] == "sft+text" and [s["kind"] for s in sources.values()] == ["sft", "text"]
    assert [sources["chatterbot"]["mixed_train_examples"], sources["bbc_text"]["mixed_train_examples"]] == \
        [3 * 16, sources["bbc_text"]["train"]["examples"]]
    results = info["results"]
    for name in sources:
        assert results[f"eval/{name}/loss_after"] < results[f"eval/{name}/loss_before"], name
    counts = {n: s["eval"]["loss_tokens"] for n, s in sources.items()}
    combined = sum(results[f"eval/{n}/loss_after"] * c for n, c in counts.items()) / sum(counts.values())
    assert results["eval/loss_after"] == pytest.approx(combined, rel=1e-5)
    assert "source bbc_text (text, " in caplog.text and "examples in the mixed training set" in caplog.text
    assert "--- training example 0 (labelled tokens between [[ and ]]) ---" in caplog.text
    assert "--- training example 0 (labelled tokens between [[ and ]]) ---" in caplog.text


def test_petuner_data_shows_counts_and_marked_examples(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "qa.jsonl", QA)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert petuner_main(["data", "model=tiny_llama", "data=hf", f"data.path={path}",
                         "data.columns={prompt: question, response: answer}", "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert f"source hf (sft, {path})" in out and "     38 examples" in out and "0 truncated, 0 dropped" in out
    assert "<|im_start|>assistant\n[[It is" in out and ".<|im_end|>]]\n" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "cache"])  # the tokenization cache only


def _chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = _chat(("user", "hi"), ("assistant", "hello"))
BAD_ROWS = {  # the second row of a chat file is bad
    "malformed": ({"messages": "hi"}, r"chats.jsonl row 2: expected a non-empty list of \{role, content\} objects"),
    "role": (_chat(("user", "hi"), ("bot", "hello")), r"chats.jsonl row 2: turn 2 has unknown role 'bot' \(allowed"),
    "empty": (_chat(("user", "hi"), ("assistant", "  ")), r"chats.jsonl row 2: turn 2 \(assistant\) is empty"),
    "alternation": (_chat(("user", "a"), ("user", "b"), ("assistant", "c")),
                    r"chats.jsonl row 2: turn 2 is user where assistant was expected"),
    "ending": (_chat(("user", "a"), ("assistant", "b"), ("user", "c")),
               r"chats.jsonl row 2: the conversation does not end with an assistant turn"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_conversation_is_one_line_naming_file_and_row(tmp_path, capsys, private_cache, case) -> None:
    row, message = BAD_ROWS[case]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD, row] + [GOOD] * 8))
    # eval_size=0.5 keeps every row in one of the two splits whatever the shuffle; both are checked.
    assert petuner_main(["data", "model=tiny_llama", "data=chat", f"data.path={path}", "data.eval_size=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not list(private_cache.rglob("*.arrow"))  # nothing written


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    chats = tmp / "chats.jsonl"
    chats.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(10)))
    write(tmp / "qa.csv", QA)
    (tmp / "broken.parquet").write_bytes(b"PAR1 not really")
    Dataset.from_dict({"text": []}).to_parquet(str(tmp / "empty.parquet"))
    long = tmp / "long.jsonl"
    rows = [_chat(("user", "word " * 50), ("assistant", "ok"))] + [GOOD] * 9
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hf = ["data=hf"]
    return {
        "missing column": ([*hf, f"data.path={tmp / 'qa.csv'}", "data.columns={prompt: query, response: answer}"],
                           r"^error: data.columns.prompt='query': .*qa.csv has no column 'query' \(columns: question"),
        "unknown petuner column": ([*hf, f"data.path={tmp / 'qa.csv'}", "data.columns={answer: answer}"],
                                   r"^error: data.columns.answer: unknown petuner column \(allowed: "),
        "empty split": ([*hf, f"data.path={tmp / 'empty.parquet'}"], r"empty.parquet'?: split 'train' has no rows"),
        "missing split": ([*hf, f"data.path={tmp / 'qa.csv'}", "data.split=test"],
                          r"^error: data.split='test' is not in data.path=.* \(splits: train\)"),
        "hub offline": ([*hf, "data.path=someone/not-downloaded"],
                        r"^error: data.path='someone/not-downloaded': not in the local datasets cache and the hub is "
                        r"offline .* or set data.path to a local file or folder"),
        "unreadable parquet": ([*hf, f"data.path={tmp / 'broken.parquet'}"],
                               r"broken.parquet': cannot be read by datasets \(.*[Pp]arquet"),
        "no path": (["data=chat"], r"^error: data.path is not set: data=chat needs data.path=... "
                                   r"\(a file, a folder, a hub id or asset:<name>\)$"),
        "no such file": ([*hf, f"data.path={tmp / 'nope.jsonl'}"], r"nope.jsonl': no such file or folder$"),
        "weight": (["data=mixture", f"data.sources=[{{path:'{chats}',weight:0}},{{path:'{tmp / 'qa.csv'}'}}]"],
                   r"^error: data.sources\[0\].weight=0: must be a number > 0$"),
        "source key": (["data=mixture", f"data.sources=[{{path:'{chats}',wieght:2}}]"],
                       r"^error: data.sources\[0\].wieght: unknown key \(allowed: name, format, path"),
        "same names": (["data=mixture", f"data.sources=[{{path:'{chats}'}},{{path:'{chats}'}}]"],
                       r"^error: data.sources: two sources are named 'chats'; set their name keys$"),
        "train_on": ([*hf, f"data.path={chats}", "data.train_on=everything"],
                     r"^error: data.train_on='everything': allowed: assistant, last_assistant, all$"),
        "truncation error": ([*hf, f"data.path={long}", "data.truncation=error", "data.max_length=48",
                              "data.eval_size=0.5"],
                             r"long.jsonl row 1: \d+ tokens exceed data.max_length=48 \(data.truncation=error"),
        "train_on text": ([*hf, f"data.path={tmp / 'qa.csv'}", "data.columns={text: question}",
                           "data.train_on=last_assistant"],
                          r"^error: data.train_on=last_assistant applies to conversations, not to text data"),
    }


def test_bad_input_is_one_line_with_status_2_and_writes_nothing(tmp_path, capsys, private_cache,
                                                                monkeypatch) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases = _bad_inputs(inputs)
    capsys.readouterr()  # what writing the inputs printed (datasets' progress bars)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for case, (overrides, message) in cases.items():
        assert petuner_main(["data", "model=tiny_llama", *overrides]) == 2, case
        err = capsys.readouterr().err
        assert err.count("\n") == 1, (case, err)
        assert re.search(message, err.strip()), (case, err)
    assert not list(work.iterdir()) and not list(private_cache.rglob("*.arrow"))


def test_a_run_with_bad_data_writes_nothing(tmp_path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD, BAD_ROWS["role"][0]] * 5))
    cfg = tiny(tmp_path, "data=chat", f"data.path={path}", "data.eval_size=0.5")
    with pytest.raises(sft.PetunerError, match="unknown role 'bot'"):
        run(cfg)
    assert not list((tmp_path / "run").iterdir())


def test_folders_and_datasets_saved_to_disk_load_like_files(tmp_path) -> None:
    tokenizer = load_tokenizer(compose_config(["model=tiny_llama", "run_dir=."]).model)
    folder = tmp_path / "parts"
    folder.mkdir()
    write(folder / "a.jsonl", QA[:20])
    write(folder / "b.jsonl", QA[20:])
    Dataset.from_list(QA).save_to_disk(str(tmp_path / "saved"))
    write(tmp_path / "qa.parquet", QA)
    built = {}
    for name in ("parts", "saved", "qa.parquet"):
        cfg = tiny(tmp_path, "data=hf", f"data.path={tmp_path / name}",
                   "data.columns={prompt: question, response: answer}")
        bundle = build_data(cfg.data, tokenizer, "causal_lm")
        built[name] = sorted(map(tuple, [*bundle.train["input_ids"], *bundle.eval["input_ids"]]))
    assert len(built["parts"]) == 40 and built["parts"] == built["saved"] == built["qa.parquet"]
