"""Allowed values that the command line and the config checks name, importable without torch."""

from __future__ import annotations

EXPORT_FORMATS = ("peft", "merged", "quantized", "gguf", "gguf-lora")
GGUF_DTYPES = ("f32", "f16", "q8_0")
MERGE_METHODS = ("linear", "cat", "svd", "task_arithmetic", "ties", "dare_linear", "dare_ties")
# The run's `objective`: which way is better, and which model tasks' evaluations report it. Keyed by the
# task, not the data kind: every kind (chat, sft, text, and mixtures such as sft+text) belongs to one task,
# so the objective is checked with the config, before any data is read.
# A preference objective (loss=dpo, simpo, orpo, kto; reward on a seq_cls model) measures eval/loss and the rewards
# instead of perplexity or accuracy.
DIRECTIONS = {"eval/loss": "minimize", "eval/perplexity": "minimize", "eval/accuracy": "maximize",
              "eval/rewards/accuracies": "maximize", "eval/rewards/margins": "maximize"}
TASK_METRICS = {"causal_lm": ("eval/loss", "eval/perplexity", "eval/rewards/accuracies", "eval/rewards/margins"),
                "seq_cls": ("eval/loss", "eval/accuracy", "eval/rewards/accuracies", "eval/rewards/margins")}
PREFERENCE_METRICS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")
LANGUAGE_METRICS = ("eval/loss", "eval/perplexity", "eval/accuracy")
