"""Every instruction form as one list of ``{role, content}`` messages, checked before it is tokenized.

OpenAI ``messages`` rows are taken as they are; ShareGPT ``conversations`` rows (``from``/``value``,
human/gpt), Alpaca rows (``instruction``, optional ``input``, ``output``) and ``{prompt, response}``
pairs are turned into the same form, so every form of one conversation gives identical tensors.
"""

from __future__ import annotations

from typing import Any

from petuner.errors import PetunerError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# The columns each conversation form is recognised by, in the order ``data.kind=auto`` tries them.
FORMS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
         "pair": ("prompt", "response")}
OPTIONAL = {"alpaca": ("input",)}


def form_of(columns: set[str]) -> str | None:
    return next((form for form, needed in FORMS.items() if set(needed) <= columns), None)


def _turns(value: Any, keys: tuple[str, str], roles: dict[str, str], fault: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise PetunerError(f"{fault}: expected a non-empty list of {{{keys[0]}, {keys[1]}}} objects, "
                           f"got {type(value).__name__}")
    out = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or keys[0] not in turn or keys[1] not in turn:
            raise PetunerError(f"{fault}: turn {number} is not a {{{keys[0]}, {keys[1]}}} object")
        role, content = turn[keys[0]], turn[keys[1]]
        if role not in roles:
            raise PetunerError(f"{fault}: turn {number} has unknown role {role!r} (allowed: {', '.join(roles)})")
        if not isinstance(content, str) or not content.strip():
            raise PetunerError(f"{fault}: turn {number} ({role}) is empty")
        out.append({"role": roles[role], "content": content})
    return out


def to_messages(row: dict[str, Any], form: str, system_prompt: str | None, fault: str) -> list[dict[str, str]]:
    """The row as checked messages; ``fault`` (file and row) starts every error line."""
    if form == "messages":
        messages = _turns(row["messages"], ("role", "content"), {r: r for r in ROLES}, fault)
    elif form == "sharegpt":
        messages = _turns(row["conversations"], ("from", "value"), SHAREGPT_ROLES, fault)
    else:
        if form == "alpaca":
            prompt = "\n\n".join(str(p) for p in (row["instruction"], row.get("input")) if p and str(p).strip())
            reply = _text(row["output"])
        else:
            prompt, reply = _text(row["prompt"]), _text(row["response"])
        pair = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        messages = _turns(pair, ("role", "content"), {r: r for r in ROLES}, fault)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    check_alternation(messages, fault)
    return messages


def _text(value: Any) -> Any:
    """Numbers in a prompt or answer column are text; anything else is left for the turn check to reject."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def check_alternation(messages: list[dict[str, str]], fault: str) -> None:
    """An optional leading system message, then user and assistant in turn, ending with the assistant."""
    start = 1 if messages[0]["role"] == "system" else 0
    for number, message in enumerate(messages[start:], start=start + 1):
        expected = ("user", "assistant")[(number - start - 1) % 2]
        if message["role"] != expected:
            raise PetunerError(f"{fault}: turn {number} is {message['role']} where {expected} was expected "
                               "(an optional system turn first, then user and assistant alternating)")
    if messages[-1]["role"] != "assistant":
        raise PetunerError(f"{fault}: the conversation does not end with an assistant turn (nothing to learn)")
