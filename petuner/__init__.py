"""petuner: parameter-efficient fine-tuning of language models behind one Hydra command line.

    model, tokenizer = petuner.load("adapters/<run>")  # a trained run, adapter attached
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(run_dir: str, **kwargs: Any) -> tuple[Any, Any]:
    """The trained model (adapter attached, eval mode, CPU) and its tokenizer from a run folder."""
    from petuner.run_folder import load as load_run

    loaded = load_run(run_dir, **kwargs)
    return loaded.model, loaded.tokenizer


__all__ = ["__version__", "load"]
