"""What the model will be trained on: counts, lengths and truncation per source and split, and examples
decoded with the labelled spans marked. Shown by ``petuner data`` and at the start of every run's log."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset

from petuner.data.columns import in_rows
from petuner.data.sft import IGNORE

OPEN, CLOSE = "[[", "]]"  # around labelled spans in the decoded view


def _lengths(dataset: Dataset) -> np.ndarray:
    return pc.list_value_length(dataset.data.column("input_ids")).to_numpy(zero_copy_only=False)


def _labelled(dataset: Dataset, column: str) -> np.ndarray:
    labels = dataset.data.column(column)
    flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False) != IGNORE
    per_row = np.bincount(pc.list_parent_indices(labels).to_numpy(), weights=flat, minlength=len(labels))
    per_row -= pc.list_element(labels, 0).to_numpy(zero_copy_only=False) != IGNORE
    return in_rows(dataset, per_row.astype(np.int64))


def loss_per_row(dataset: Dataset, kind: str) -> np.ndarray:
    """Tokens each example puts into the loss; the first label never counts (nothing predicts it). A
    preference pair counts its chosen side's, and none if either side has none."""
    if kind == "classification":
        return np.ones(len(dataset), dtype=np.int64)
    chosen = _labelled(dataset, "labels")
    return np.where(_labelled(dataset, "rejected_labels") > 0, chosen, 0) if kind == "preference" else chosen


def split_stats(dataset: Dataset, kind: str) -> dict[str, Any]:
    """Examples, tokens, loss tokens and length percentiles of one tokenized split."""
    lengths = in_rows(dataset, _lengths(dataset))
    pct = np.percentile(lengths, [50, 90, 99]).round().astype(int).tolist() if len(lengths) else [0, 0, 0]
    return {"examples": len(lengths), "tokens": int(lengths.sum()),
            "loss_tokens": int(loss_per_row(dataset, kind).sum()),
            "length_p50": pct[0], "length_p90": pct[1], "length_p99": pct[2], "length_max": int(lengths.max(initial=0))}


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, source in report["sources"].items():
        head = f"source {name} ({source['kind']}, {source['where']})"
        if "mixed_train_examples" in source:
            head += f": {source['mixed_train_examples']} examples in the mixed training set"
        lines.append(head)
        for split in ("train", "eval"):
            s = source[split]
            lines.append(f"  {split:5s} {s['examples']:>7,} examples {s['tokens']:>10,} tokens "
                         f"({s['loss_tokens']:,} with loss); length p50/p90/p99/max "
                         f"{s['length_p50']}/{s['length_p90']}/{s['length_p99']}/{s['length_max']}; "
                         f"{s['truncated']} truncated, {s['dropped']} dropped"
                         + (f" ({s['ties']} ties)" if s.get("ties") else ""))
    return lines


def show_example(example: dict[str, Any], tokenizer: Any, kind: str, label_names: list[str]) -> str:
    """One example decoded; the tokens that carry loss between [[ and ]] (a pair: both sides; KTO's row: its label)."""
    ids = example["input_ids"]
    if kind == "classification":
        return f"{tokenizer.decode(ids)!r} -> label {label_names[example['labels']]!r}"
    if kind == "preference":
        return (f"chosen:\n{_marked(ids, example['labels'], tokenizer)}\n"
                f"rejected:\n{_marked(example['rejected_input_ids'], example['rejected_labels'], tokenizer)}")
    if kind == "unpaired":
        label = "desirable" if example["desirable"] else "undesirable"
        return f"{label}:\n{_marked(ids, example['labels'], tokenizer)}"
    return _marked(ids, example["labels"], tokenizer)


def _marked(ids: list[int], labels: list[int], tokenizer: Any) -> str:
    return "".join(f"{OPEN}{text}{CLOSE}" if labelled else text for text, labelled in labelled_spans(ids, labels,
                                                                                                      tokenizer))


def labelled_spans(ids: list[int], labels: list[int], tokenizer: Any) -> list[tuple[str, bool]]:
    """Token ids decoded as (text, carries loss) runs (the web page highlights them)."""
    spans: list[tuple[str, bool]] = []
    run: list[int] = []
    labelled = False
    for token, label in zip(ids, labels, strict=True):
        if (label != IGNORE) != labelled:
            if run:
                spans.append((tokenizer.decode(run), labelled))
            run, labelled = [], not labelled
        run.append(token)
    if run:
        spans.append((tokenizer.decode(run), labelled))
    return spans


def describe(data: Any, tokenizer: Any, examples: int) -> str:
    """The summary and the first ``examples`` training examples, as ``petuner data`` prints them."""
    counts = data.report
    packed = (f" (packed into {counts['train_rows']:,} and {counts['eval_rows']:,} rows)"
              if "train_rows" in counts else "")
    lines = [*summary_lines(counts),
             f"training on {counts['train_examples']:,} examples, evaluating on {counts['eval_examples']:,}{packed}"]
    for i in range(min(examples, len(data.train))):
        marks = "" if data.kind == "classification" else f" (labelled tokens between {OPEN} and {CLOSE})"
        lines.append(f"--- training example {i}{marks} ---")
        lines.append(show_example(data.train[i], tokenizer, data.kind, data.label_names))
    return "\n".join(lines)
