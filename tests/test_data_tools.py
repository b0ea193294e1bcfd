"""Conversations as people write them: content as a list of parts, and tool calling through the chat template's
own tool support, with a golden loss mask on a Qwen2.5-style template set on the tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from petuner.data import build_data
from petuner.data.conversations import row_tools, to_messages
from petuner.data.sft import IGNORE, tokenize
from petuner.errors import PetunerError
from petuner.models import load_tokenizer

from .conftest import make_cfg

# Qwen2.5-Instruct's template (its tool branch), as the model ships it, less its long default system line.
QWEN25 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == \"assistant\" %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == \"tool\" %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
# OpenAI's form: a call with content null and its arguments as a JSON string, then the tool's result
TOOL_CHAT = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": 18}"},
    {"role": "assistant", "content": "It is 18 °C in Paris."}]}
SETTINGS = OmegaConf.create({"max_length": 1024, "train_on": "assistant", "truncation": "error"})


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer(OmegaConf.create({"tokenizer": "asset:smollm2-tokenizer", "trust_remote_code": False}))
    own = tok.chat_template
    yield tok
    tok.chat_template = own


def spans(tok, example) -> list[str]:
    out, run = [], []
    for token, label in zip(example["input_ids"], [*example["labels"], IGNORE], strict=False):
        if label != IGNORE:
            run.append(token)
        elif run:
            out.append(tok.decode(run))
            run = []
    return out + ([tok.decode(run)] if run else [])


def test_tool_calls_render_through_the_template_and_the_loss_covers_calls_and_answers(tokenizer) -> None:
    tokenizer.chat_template = QWEN25
    messages = to_messages(TOOL_CHAT, "messages", None, "row 1")
    example = tokenize(messages, tokenizer, SETTINGS, "row 1", row_tools(TOOL_CHAT, "row 1"))
    text = tokenizer.decode(example["input_ids"])
    assert "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\"" in text  # the tools list
    assert "<tool_response>\n{\"celsius\": 18}\n</tool_response>" in text
    # golden: exactly the call (arguments decoded from OpenAI's JSON string) and the answer, each with <|im_end|>
    assert spans(tokenizer, example) == [
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>",
        "It is 18 °C in Paris.<|im_end|>"]


def test_a_template_without_tool_support_is_one_line_naming_the_model(tokenizer) -> None:
    tokenizer.chat_template = load_tokenizer(OmegaConf.create({"tokenizer": "asset:smollm2-tokenizer",
                                                               "trust_remote_code": False})).chat_template
    messages = to_messages(TOOL_CHAT, "messages", None, "row 1")
    with pytest.raises(PetunerError, match=r"row 1: the chat template of .*smollm2.* has no tool support \(it never "
                                           r"reads 'tool_calls'\)"):
        tokenize(messages, tokenizer, SETTINGS, "row 1", row_tools(TOOL_CHAT, "row 1"))


def test_text_parts_train_as_their_joined_text_and_other_parts_are_one_line(tokenizer) -> None:
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of "},
                                                       {"type": "text", "text": "France?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]}]}
    plain = {"messages": [{"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Paris."}]}
    assert to_messages(parts, "messages", None, "r") == to_messages(plain, "messages", None, "r")
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    with pytest.raises(PetunerError, match=r"r: turn 1 \(user\) has a content part of type 'image_url'; only text"):
        to_messages(image, "messages", None, "r")


def test_tool_turns_must_follow_a_call(tokenizer) -> None:
    stray = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"},
                          {"role": "assistant", "content": "ok"}]}
    with pytest.raises(PetunerError, match=r"r: turn 2 is tool where assistant was expected"):
        to_messages(stray, "messages", None, "r")


def test_a_jsonl_mixing_text_parts_and_tool_calls_builds(tmp_path: Path, tokenizer) -> None:
    """Arrow would refuse these rows in one column (text vs parts content; differing argument keys)."""
    tokenizer.chat_template = QWEN25
    other = json.loads(json.dumps(TOOL_CHAT))
    other["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Rome", "units": "metric"}
    rows = [TOOL_CHAT, other, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                            {"role": "assistant", "content": "hello"}]}] * 4
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(tmp_path / "run", "data=jsonl", f"data.path={path}", "data.eval_size=3", "data.limit=null",
                   "data.max_length=512")
    data = build_data(cfg.data, tokenizer, "causal_lm")
    texts = [tokenizer.decode(e["input_ids"]) for e in (*data.train, *data.eval)]
    assert sum("\"arguments\": {\"city\": \"Rome\", \"units\": \"metric\"}" in t for t in texts) == 4
    assert sum("\"arguments\": {\"city\": \"Paris\"}}" in t for t in texts) == 4  # no "units": null added
