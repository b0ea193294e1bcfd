"""Every instruction form as one list of ``{role, content}`` messages, checked before it is tokenized.

OpenAI ``messages`` rows are taken as they are; ShareGPT ``conversations`` rows (``from``/``value``,
human/gpt), Alpaca rows (``instruction``, optional ``input``, ``output``) and ``{prompt, response}``
pairs are turned into the same form, so every form of one conversation gives identical tensors.

``messages`` may be written as OpenAI's API and TRL take them: a turn's ``content`` as a list of parts
(text parts train as their concatenated text, as chat templates render parts; any other part is refused),
and tool calling: an assistant turn with ``tool_calls`` (content may be null), ``tool`` turns with the
results, and a per-row ``tools`` list of function schemas. Those are rendered by the chat template's own
tool support (``apply_chat_template(tools=...)``, see ``petuner.data.sft``). Tool-call arguments given as
a JSON string (OpenAI's form) are decoded to the object templates expect. A JSON Lines file's conversation
columns travel through Arrow as JSON text (``petuner.data.sources``): Arrow's one schema per column would
refuse a file mixing text and parts, or give every call's arguments the keys of all the others.
"""

from __future__ import annotations

import json
from typing import Any

from petuner.errors import PetunerError

ROLES = ("system", "user", "assistant", "tool")
JSON_COLUMNS = ("messages", "conversations", "tools")  # nested columns kept as JSON text through Arrow
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# The columns each conversation form is recognised by, in the order ``data.kind=auto`` tries them.
FORMS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
         "pair": ("prompt", "response")}
OPTIONAL = {"alpaca": ("input",), "messages": ("tools",)}


def form_of(columns: set[str]) -> str | None:
    return next((form for form, needed in FORMS.items() if set(needed) <= columns), None)


def as_json_text(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its nested conversation columns (``JSON_COLUMNS``) as JSON text, for Arrow."""
    return {k: json.dumps(v) if k in JSON_COLUMNS and isinstance(v, (list, dict)) else v for k, v in row.items()}


def decoded(value: Any) -> Any:
    """A conversation column's value: JSON text (as a JSON Lines file's rows carry it) decoded, else as it is."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _text(content: Any, role: str, number: int, fault: str) -> Any:
    """Content given as a list of parts: its text parts joined; a part of another type is one line."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise PetunerError(f"{fault}: turn {number} ({role}) has a content part of type {kind!r}; only text "
                               "parts ({\"type\": \"text\", \"text\": ...}) can train")
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(calls: Any, number: int, fault: str) -> list[dict[str, Any]]:
    """OpenAI-style calls as chat templates read them: {type: function, function: {name, arguments: object}}."""
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise PetunerError(f"{fault}: turn {number} has a tool call without a function name")
        arguments = decoded(function.get("arguments") or {})
        if not isinstance(arguments, dict):
            raise PetunerError(f"{fault}: turn {number}: the arguments of tool call {function['name']!r} are not "
                               "a JSON object")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def _turns(value: Any, keys: tuple[str, str], roles: dict[str, str], fault: str) -> list[dict[str, Any]]:
    value = decoded(value)
    if not isinstance(value, list) or not value:
        raise PetunerError(f"{fault}: expected a non-empty list of {{{keys[0]}, {keys[1]}}} objects, "
                           f"got {type(value).__name__}")
    out = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or keys[0] not in turn or (keys[1] not in turn and not turn.get("tool_calls")):
            raise PetunerError(f"{fault}: turn {number} is not a {{{keys[0]}, {keys[1]}}} object")
        role = turn[keys[0]]
        if role not in roles:
            raise PetunerError(f"{fault}: turn {number} has unknown role {role!r} (allowed: {', '.join(roles)})")
        content, message = _text(turn.get(keys[1]), role, number, fault), {"role": roles[role]}
        if turn.get("tool_calls") and roles[role] == "assistant":
            message["tool_calls"] = _tool_calls(turn["tool_calls"], number, fault)
            content = content or ""
        elif not isinstance(content, str) or not content.strip():
            raise PetunerError(f"{fault}: turn {number} ({role}) is empty")
        message["content"] = content
        message.update({k: turn[k] for k in ("name", "tool_call_id") if roles[role] == "tool" and turn.get(k)})
        out.append(message)
    return out


def row_tools(row: dict[str, Any], fault: str) -> list[dict[str, Any]] | None:
    """A row's ``tools`` (function schemas for the chat template), or None."""
    tools = decoded(row.get("tools"))
    if tools in (None, []):
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise PetunerError(f"{fault}: tools must be a list of function schemas (JSON objects)")
    return tools


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """``data.system_prompt`` before a conversation that has no system turn of its own."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def to_messages(row: dict[str, Any], form: str, system_prompt: str | None, fault: str) -> list[dict[str, str]]:
    """The row as checked messages; ``fault`` (file and row) starts every error line."""
    if form == "messages":
        messages = _turns(row["messages"], ("role", "content"), {r: r for r in ROLES}, fault)
    elif form == "sharegpt":
        messages = _turns(row["conversations"], ("from", "value"), SHAREGPT_ROLES, fault)
    else:
        if form == "alpaca":
            prompt = "\n\n".join(str(p) for p in (row["instruction"], row.get("input")) if p and str(p).strip())
            reply = _scalar_text(row["output"])
        else:
            prompt, reply = _scalar_text(row["prompt"]), _scalar_text(row["response"])
        pair = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        messages = _turns(pair, ("role", "content"), {r: r for r in ROLES[:3]}, fault)
    messages = with_system_prompt(messages, system_prompt)
    check_alternation(messages, fault)
    return messages


def _scalar_text(value: Any) -> Any:
    """Numbers in a prompt or answer column are text; anything else is left for the turn check to reject."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def check_alternation(messages: list[dict[str, Any]], fault: str) -> None:
    """An optional leading system message, then user and assistant in turn, ending with the assistant; an
    assistant's tool calls are followed by one or more tool results, then the assistant again."""
    start = 1 if messages[0]["role"] == "system" else 0
    expected = ("user",)
    for number, message in enumerate(messages[start:], start=start + 1):
        role = message["role"]
        if role not in expected:
            raise PetunerError(f"{fault}: turn {number} is {role} where {' or '.join(expected)} was expected "
                               "(an optional system turn first, then user and assistant alternating, tool results "
                               "after an assistant's tool calls)")
        expected = {"user": ("assistant",), "tool": ("tool", "assistant")}.get(
            role, ("tool",) if message.get("tool_calls") else ("user",))
    if messages[-1]["role"] != "assistant":
        raise PetunerError(f"{fault}: the conversation does not end with an assistant turn (nothing to learn)")
