"""The data a command line would train on, built as ``train.py`` builds it (tokenizer only, no weights).

Shared by ``petuner data`` (printed) and the web page (the labelled spans highlighted).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from petuner.data.report import labelled_spans, show_example, summary_lines


def prepared_data(overrides: Sequence[str], config_dir: Path | None = None) -> tuple[Any, Any]:
    """(data bundle, tokenizer) for these overrides (and the user's ``--config-dir``); one ConfigError line for
    a bad value, before any reading."""
    from petuner.config import check_command_line, compose_config, validate
    from petuner.data import build_data
    from petuner.data.schema import check_max_length
    from petuner.models import context_length, load_tokenizer, model_config

    check_command_line(overrides, config_dir)
    cfg = compose_config([*overrides, "run_dir=."], config_dir)
    plan = validate(cfg)
    check_max_length(plan.data, context_length(model_config(cfg.model)))
    tokenizer = load_tokenizer(cfg.model)
    data = build_data(plan.data, tokenizer, cfg.model.task, check_kind=plan.objective.check_data_kind)
    plan.objective.prepare_data(data, tokenizer, int(cfg.data.max_length))  # the rows it trains on (KTO's)
    return data, tokenizer


def highlighted(data: Any, tokenizer: Any, examples: int) -> tuple[str, list[list[tuple[str, str | None]]]]:
    """The report's summary, and the first training examples as (text, "loss" or None) spans."""
    summary = "\n".join([*summary_lines(data.report), f"training on {data.report['train_examples']:,} examples, "
                                                      f"evaluating on {data.report['eval_examples']:,}"])
    shown = []
    for i in range(min(examples, len(data.train))):
        if data.kind == "classification":
            shown.append([(show_example(data.train[i], tokenizer, data.kind, data.label_names), None)])
        else:
            shown.append(_spans(data.train[i], tokenizer, data.kind == "preference"))
    return summary, shown


def _spans(example: dict[str, Any], tokenizer: Any, pair: bool) -> list[tuple[str, str | None]]:
    """An example as highlighted spans; a preference pair as its chosen side, then its rejected side."""
    sides = [("", "input_ids", "labels"), *([("\n[rejected]\n", "rejected_input_ids", "rejected_labels")] if pair
                                           else [])]
    spans: list[tuple[str, str | None]] = []
    for heading, ids, labels in sides:
        spans += [(heading, None)] if heading else []
        spans += [(text, "loss" if labelled else None)
                  for text, labelled in labelled_spans(example[ids], example[labels], tokenizer)]
    return spans
