"""Chat with runs from the page: answers streamed token by token, a run beside another run or its bare base.

Generation is ``petuner.generate``'s (the prompt formatted as training formatted it); the base is the same
loaded model with its adapters switched off (``disabled_adapters``), so no second copy is loaded. One lock
per loaded model: two browser tabs never switch a model's adapters under each other's generation.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from petuner.adapters.base import disabled_adapters
from petuner.generate import Generator, Sampling, load_generator

BASE = " (base)"  # suffix naming a run's bare base model in the menus
_loaded: dict[str, tuple[Generator, threading.Lock]] = {}
_loading = threading.Lock()
KEEP = 2  # loaded runs kept in memory; the oldest is dropped beyond


def loaded(run_dir: str) -> tuple[Generator, threading.Lock]:
    with _loading:
        if run_dir not in _loaded:
            while len(_loaded) >= KEEP:
                _loaded.pop(next(iter(_loaded)))
            _loaded[run_dir] = (load_generator(Path(run_dir)), threading.Lock())
        return _loaded[run_dir]


def stream(target: str, history: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
    """The answer so far, after each new piece; ``target`` is a run folder, or one ending in BASE."""
    from transformers import TextIteratorStreamer

    sampling.check()
    base = target.endswith(BASE)
    gen, lock = loaded(target.removesuffix(BASE))
    with lock, (disabled_adapters(gen.model) if base else contextlib.nullcontext()):
        batch = gen.encode([gen.messages_text(history)])
        streamer = TextIteratorStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=gen.generate_ids, args=(batch, sampling), kwargs={"streamer": streamer})
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text.strip()
        worker.join()
