"""Allowed values that the command line and the config checks name, importable without torch."""

from __future__ import annotations

EXPORT_FORMATS = ("peft", "merged", "quantized", "gguf")
GGUF_DTYPES = ("f32", "f16", "q8_0")
# The run's `objective`: which way is better, and which kinds of data measure it.
DIRECTIONS = {"eval/loss": "minimize", "eval/perplexity": "minimize", "eval/accuracy": "maximize"}
KIND_METRICS = {"classification": ("eval/loss", "eval/accuracy"),
                "sft": ("eval/loss", "eval/perplexity"), "text": ("eval/loss", "eval/perplexity")}
