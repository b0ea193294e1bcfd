"""``petuner eval RUN_DIR data=... [data.path=...]``: a trained model's held-out metrics on other data.

The data comes from the same config group and Hydra overrides as training (``compose_config``), is
read and tokenized by the same data layer, and scored by the training loop's own ``evaluate`` — so
evaluating a run on the data it trained on reproduces its final ``eval/*`` numbers. Preference pairs are
scored as a preference run trained: its own objective against its own reference (the adapter switched
off, the run it continued, or the base model), giving eval/rewards/accuracies and the other rewards. The
metrics are written to ``RUN_DIR/eval-<name>[-<checkpoint>][-all].json`` (``report_file``).
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

    data.set_evals({name: concatenate_datasets([data.trains[name], held_out]) for name, held_out in data.evals.items()})


def evaluate_run(path: Path | str, overrides: Sequence[str], *, split: str = "eval", batch_size: int = 16,
                 checkpoint: str | None = None, trust_remote_code: bool = False) -> tuple[Path, dict[str, Any]]:
    """Score the model in ``path`` on the data the overrides name; returns the report's path and contents."""
    import petuner
    from petuner.data import TASKS_OF_KIND, build_data, source_configs
    from petuner.data.columns import prepare
    from petuner.data.sources import load_source
    from petuner.run_folder import folder_labels, folder_task
    from petuner.run_folder import load as load_run
    from petuner.train.device import resolve_device
    from petuner.train.loop import evaluate
    from petuner.train.objective import Objective

    if split not in SPLITS:
        raise PetunerError(f"--split {split!r}: allowed: {', '.join(SPLITS)}")
    path = Path(path)
    task = folder_task(path)
    data_cfg = eval_data_cfg(overrides)
    for src in source_configs(data_cfg):  # checked on the rows, before any weights load
        dataset, where = load_source(src)
        kind = prepare(dataset, src.kind, where, src.columns)[1]
        if task not in TASKS_OF_KIND[kind]:
            raise ConfigError(f"data={report_name(data_cfg)} is {kind} data, for a "
                              f"{' or '.join(TASKS_OF_KIND[kind])} model, but {path} is a {task} model")
    kwargs = {"checkpoint": checkpoint} if checkpoint else {}
    if kind in ("preference", "unpaired"):  # scored as the run trained: its objective and its reference
        loaded = load_run(path, trust_remote_code=trust_remote_code, **kwargs)
        model, tokenizer, objective = loaded.model, loaded.tokenizer, run_objective(loaded)
        objective.check_data_kind(kind)  # e.g. KTO's unpaired rows for a DPO run
    else:
        (model, tokenizer), objective = petuner.load(path, trust_remote_code=trust_remote_code, **kwargs), Objective()
    data = build_data(data_cfg, tokenizer, task)
    if data.label_names != folder_labels(path):
        raise PetunerError(f"the data's labels {data.label_names} differ from the ones {path} learnt "
                           f"{folder_labels(path)}")
    if split == "all":
        every_example(data)
    objective.prepare_data(data, tokenizer, int(data_cfg.max_length))
    device = resolve_device("auto")
    if getattr(objective, "needs_reference", False):
        objective.reference = run_reference(loaded, device)
    metrics = evaluate(model.to(device), data, batch_size, device, None, objective)
    report = {"model": str(path), "checkpoint": checkpoint or "last", "data": _plain(data_cfg),
              "split": split, "examples": len(data.eval), **metrics}
    out = path / report_file(data_cfg, checkpoint, split)
    atomic_write_json(out, report)
    return out, report


def run_objective(loaded: Any) -> Any:
    """The run's own preference objective, to score held-out pairs (loss, rewards, reward accuracy)."""
    from petuner.objectives import build_objective
    from petuner.objectives.pairs import Pairs

    loss = loaded.cfg.get("loss") or {"name": "sft"}
    objective = build_objective({k: v for k, v in loss.items() if k != "precompute_reference"})
    if not isinstance(objective, Pairs):
        raise ConfigError("preference data score a run trained with a preference loss (dpo, simpo, orpo, kto, "
                          f"reward); this run trained with loss={loss['name']}")
    return objective


def run_reference(loaded: Any, device: Any) -> Any:
    """The reference the run trained against: its starting adapter (``init_from``), the base model (full
    fine-tuning), or the adapter switched off."""
    from petuner.objectives.reference import FrozenCopy, StartingAdapter, build_reference
    from petuner.run_folder import build_base_with_adapter
    from petuner.run_folder import load as load_run

    model, cfg = loaded.model.to(device), loaded.cfg
    if cfg.get("init_from"):
        return StartingAdapter(model, start=load_run(str(cfg.init_from)).model.to(device))
    if loaded.method.name == "none":
        return FrozenCopy(build_base_with_adapter(cfg, loaded.info)[0].to(device))
    return build_reference(model, loaded.method, continued=False, heads=loaded.info.get("head_modules") or [])


def _plain(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
