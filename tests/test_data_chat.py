"""Conversations: golden loss masks on real chat templates, the forms of one conversation, truncation."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from petuner.data import build_data
from petuner.data.conversations import to_messages
from petuner.data.sft import IGNORE, tokenize
from petuner.errors import PetunerError
from petuner.models import load_tokenizer

# Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
TURNS = [("What is the capital of France?", "Paris is the capital of France."),
         ("And of Italy?", "Rome."),
         ("Which one is older?", "Rome is older, founded in 753 BC by tradition.")]


def _tokenizer(family: str):
    tok = load_tokenizer(OmegaConf.create({"tokenizer": "asset:smollm2-tokenizer", "trust_remote_code": False}))
    if family == "llama3":  # a second family: its header and end-of-turn tokens, as a Llama-3 tokenizer has them
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens":
                                ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.chat_template = LLAMA3
    elif family == "none":  # a base model's tokenizer: petuner's fallback template
        tok.chat_template = None
    return tok


END_OF_TURN = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "none": "<|im_end|>"}  # none: the eos token


@pytest.fixture(scope="module", params=["smollm2", "llama3", "none"])
def family(request):
    return request.param, _tokenizer(request.param)


def conversation(turns: int, system: bool) -> list[dict[str, str]]:
    messages = [SYSTEM] if system else []
    for question, answer in TURNS[:turns]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def settings(**kw):
    return OmegaConf.create({"max_length": 1024, "train_on": "assistant", "truncation": "drop_turns", **kw})


def labelled_spans(tok, example) -> list[str]:
    spans, run = [], []
    for token, label in zip(example["input_ids"], [*example["labels"], IGNORE], strict=False):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tok.decode(run))
            run = []
    if run:
        spans.append(tok.decode(run))
    return spans


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("turns", [1, 2, 3])
def test_labels_are_exactly_the_replies_and_their_end_of_turn(family, turns, system) -> None:
    name, tok = family
    messages = conversation(turns, system)
    example = tokenize(messages, tok, settings(), "t")
    eot = END_OF_TURN[name]
    assert labelled_spans(tok, example) == [answer + eot for _, answer in TURNS[:turns]]
    # The model sees exactly the template's rendering of the whole conversation, tokenized once.
    rendered = tok.apply_chat_template(messages, tokenize=False) if tok.chat_template else None
    if rendered is not None:
        assert example["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    last = tokenize(messages, tok, settings(train_on="last_assistant"), "t")
    assert labelled_spans(tok, last) == [TURNS[turns - 1][1] + eot]
    assert last["input_ids"] == example["input_ids"]
    everything = tokenize(messages, tok, settings(train_on="all"), "t")
    assert everything["labels"] == everything["input_ids"] == example["input_ids"]


def test_every_form_of_one_conversation_gives_identical_tensors(tmp_path) -> None:
    tok = _tokenizer("smollm2")
    chats = [conversation(turns, system) for turns in (1, 2, 3) for system in (False, True)]
    gpt = {"system": "system", "user": "human", "assistant": "gpt"}
    files = {"messages": [{"messages": c} for c in chats],
             "sharegpt": [{"conversations": [{"from": gpt[m["role"]], "value": m["content"]} for m in c]}
                          for c in chats]}
    tensors = {}
    for form, rows in files.items():
        path = tmp_path / f"{form}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
        cfg = OmegaConf.create({"name": form, "format": "hf", "kind": "auto", "path": str(path), "max_length": 512,
                                "eval_size": 4, "split_seed": 0, "limit": None})
        bundle = build_data(cfg, tok, "causal_lm")
        assert bundle.kind == "chat"
        tensors[form] = (bundle.train["input_ids"], bundle.train["labels"], bundle.eval["labels"])
    assert tensors["messages"] == tensors["sharegpt"]
    # A single exchange as Alpaca, as a {prompt, response} pair and as messages: one example.
    one = conversation(1, False)
    pair = {"prompt": one[0]["content"], "response": one[1]["content"]}
    alpaca = {"instruction": one[0]["content"], "input": "", "output": one[1]["content"]}
    forms = [to_messages(pair, "pair", None, "t"), to_messages(alpaca, "alpaca", None, "t"),
             to_messages({"messages": one}, "messages", None, "t")]
    assert forms[0] == forms[1] == forms[2] == one


def test_long_conversations_lose_whole_trailing_turns() -> None:
    tok = _tokenizer("smollm2")
    messages = conversation(3, False)
    full = tokenize(messages, tok, settings(), "t")
    two = tokenize(messages[:4], tok, settings(), "t")
    # Room for two turns and a bit: the third turn goes entirely; the result is the two-turn conversation.
    kept = tokenize(messages, tok, settings(max_length=len(two["input_ids"]) + 3), "t")
    assert kept == {**two, "truncated": 1} and full["truncated"] == 0
    assert labelled_spans(tok, kept) == [a + "<|im_end|>" for _, a in TURNS[:2]]
    cut = tokenize(messages, tok, settings(max_length=len(two["input_ids"]) + 3, truncation="cut"), "t")
    assert cut["input_ids"] == full["input_ids"][:len(two["input_ids"]) + 3]
    # A first reply longer than max_length is cut rather than thrown away (as single-turn SFT always was).
    first = tokenize(messages, tok, settings(max_length=30), "t")
    assert first["input_ids"] == full["input_ids"][:30] and first["truncated"] == 1
    with pytest.raises(PetunerError, match=r"^f.jsonl row 7: \d+ tokens exceed data.max_length=30 \(data.truncation"):
        tokenize(messages, tok, settings(max_length=30, truncation="error"), "f.jsonl row 7")


def test_a_template_that_is_not_prefix_stable_is_one_line(tmp_path) -> None:
    tok = _tokenizer("smollm2")
    # Marks the final message, as templates that strip earlier turns' reasoning do: earlier renderings differ.
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} (last)"
                         "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation(2, False)}) + "\n" for _ in range(6)))
    cfg = OmegaConf.create({"name": "c", "format": "hf", "kind": "chat", "path": str(path), "max_length": 512,
                            "eval_size": 1, "split_seed": 0, "limit": None})
    with pytest.raises(PetunerError, match=rf"^{path} row \d: the chat template is not prefix-stable") as err:
        build_data(cfg, tok, "causal_lm")
    assert "\n" not in str(err.value)
