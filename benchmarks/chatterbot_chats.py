"""Write the chatterbot corpus's conversations whole, as an OpenAI ``messages`` JSONL (docs/data.md's chat example).

``data=chatterbot`` cuts every conversation into independent (question, answer) pairs; here each
conversation stays one example whose turns alternate user/assistant (a trailing question without an
answer is left out, and so is a conversation with an empty turn), so the model learns every reply in the
context of the turns before it.

    PYTHONPATH=. .venv/bin/python benchmarks/chatterbot_chats.py [OUT]   # default: ./chatterbot_chats.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from petuner import assets
from petuner.io import atomic_write_text

DEFAULT = Path("chatterbot_chats.jsonl")


def conversations() -> list[dict]:
    rows = []
    for file in sorted(Path(assets.resolve("asset:chatterbot")).glob("*.yml")):
        for turns in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in turns][: len(turns) // 2 * 2]
            if turns and all(turns):
                rows.append({"messages": [{"role": ("user", "assistant")[i % 2], "content": t}
                                          for i, t in enumerate(turns)]})
    return rows


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    rows = conversations()
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    multi = sum(len(r["messages"]) > 2 for r in rows)
    print(f"{out}: {len(rows)} conversations, {multi} of them multi-turn")


if __name__ == "__main__":
    main()
