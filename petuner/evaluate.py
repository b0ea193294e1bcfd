"""``petuner eval RUN_DIR data=... [data.path=...]``: a trained model's held-out metrics on other data.

The data comes from the same config group and Hydra overrides as training (``compose_config``), is
read and tokenized by the same data layer, and scored by the training loop's own ``evaluate`` — so
evaluating a run on the data it trained on reproduces its final ``eval/*`` numbers. The metrics are
written to ``RUN_DIR/eval-<name>[-<checkpoint>][-all].json`` (``report_file``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from petuner.errors import ConfigError, PetunerError
from petuner.io import atomic_write_json

SPLITS = ("eval", "all")


def eval_data_cfg(overrides: Sequence[str]) -> Any:
    """The ``data`` group that ``python train.py <overrides>`` would train on (only data.* may be set)."""
    from petuner.config import check_command_line, choice_name, compose_config, group_schema
    from petuner.data.schema import check_data_combination
    from petuner.schema import conform

    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key != "data" and not key.startswith("data."):
            raise ConfigError(f"{override!r}: petuner eval takes data=... and data.*=... overrides only")
    check_command_line(overrides)
    cfg = compose_config([*overrides, "run_dir=."])
    data = conform(group_schema(cfg, "data"), cfg.data, "data", choice_name(cfg, "data"))
    check_data_combination(data)
    return data


def report_name(data_cfg: Any) -> str:
    """``eval-<name>.json``: the data config's name, or the file's stem for a user file (data=jsonl)."""
    return Path(str(data_cfg.path)).stem if data_cfg.format == "jsonl" else str(data_cfg.name)


def report_file(data_cfg: Any, checkpoint: str | None, split: str) -> str:
    """``eval-<name>.json`` for the final weights on the held-out split; other weights and ``--split all``
    add ``-<checkpoint>`` (best, step-N) and ``-all``, so each scoring keeps its own file."""
    parts = [f"eval-{report_name(data_cfg)}"]
    if checkpoint and checkpoint != "last":
        parts.append(f"step-{int(checkpoint.removeprefix('step-'))}" if checkpoint.startswith("step-") else checkpoint)
    if split != "eval":
        parts.append(split)
    return "-".join(parts) + ".json"


def every_example(data: Any) -> None:
    """``--split all``: each source's held-out set becomes all of its examples (its training examples before
    mixing, so each counts once whatever its mixture weight), and the combined set all of those."""
    from datasets import concatenate_datasets

    data.evals = {name: concatenate_datasets([data.trains[name], held_out]) for name, held_out in data.evals.items()}
    data.eval = concatenate_datasets(list(data.evals.values()))


def evaluate_run(path: Path | str, overrides: Sequence[str], *, split: str = "eval", batch_size: int = 16,
                 checkpoint: str | None = None, trust_remote_code: bool = False) -> tuple[Path, dict[str, Any]]:
    """Score the model in ``path`` on the data the overrides name; returns the report's path and contents."""
    import petuner
    from petuner.data import TASK_OF_KIND, build_data, source_configs
    from petuner.data.columns import prepare
    from petuner.data.sources import load_source
    from petuner.run_folder import folder_labels, folder_task
    from petuner.train.device import resolve_device
    from petuner.train.loop import evaluate

    if split not in SPLITS:
        raise PetunerError(f"--split {split!r}: allowed: {', '.join(SPLITS)}")
    path = Path(path)
    task = folder_task(path)
    data_cfg = eval_data_cfg(overrides)
    for src in source_configs(data_cfg):  # checked on the rows, before any weights load
        dataset, where = load_source(src)
        kind = prepare(dataset, src.kind, where, src.columns)[1]
        if TASK_OF_KIND[kind] != task:
            raise ConfigError(f"data={report_name(data_cfg)} is {kind} data, for a {TASK_OF_KIND[kind]} model, "
                              f"but {path} is a {task} model")
    kwargs = {"checkpoint": checkpoint} if checkpoint else {}
    model, tokenizer = petuner.load(path, trust_remote_code=trust_remote_code, **kwargs)
    data = build_data(data_cfg, tokenizer, task)
    if data.label_names != folder_labels(path):
        raise PetunerError(f"the data's labels {data.label_names} differ from the ones {path} learnt "
                           f"{folder_labels(path)}")
    if split == "all":
        every_example(data)
    device = resolve_device("auto")
    metrics = evaluate(model.to(device), data, batch_size, device, None)
    report = {"model": str(path), "checkpoint": checkpoint or "last", "data": _plain(data_cfg),
              "split": split, "examples": len(data.eval), **metrics}
    out = path / report_file(data_cfg, checkpoint, split)
    atomic_write_json(out, report)
    return out, report


def _plain(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
