"""Compose one run: config → model → adapter → data → optimizer → loop → saved run → export.

Everything cheap is checked first (the config, the model's config and context, the adapter's
targets on a weightless meta-device copy of the model), so a bad value fails in seconds, before the
weights load and long before training starts.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from petuner import __version__
from petuner.adapters import adapter_state_dict, build_adapter, inject
from petuner.config import validate
from petuner.data import build_data, check_data_cfg
from petuner.data.report import describe
from petuner.errors import PetunerError
from petuner.io import atomic_file, atomic_write_json, atomic_write_text
from petuner.manifest import write_manifest
from petuner.models import context_length, head_modules, load_model, load_tokenizer, model_config, model_source
from petuner.optim import build_optimizer, build_scheduler, check_optimizer_for_trainer
from petuner.run_folder import ADAPTER_FILE, CONFIG_FILE, RUN_FILE, read_config
from petuner.train.checkpoint import latest_checkpoint, load_checkpoint, save_tensors
from petuner.train.device import grad_scaler, reset_peak_memory, resolve_device, resolve_precision
from petuner.train.guard import NonFiniteGuard
from petuner.train.labelled_logits import keep_labelled_logits
from petuner.train.logging import MetricsLog
from petuner.train.loop import Loop, total_steps
from petuner.train.memory import MemoryHook

log = logging.getLogger(__name__)
# Sections whose change makes a checkpoint meaningless for the run (trainer.max_steps may grow).
RESUME_SECTIONS = ("model", "data", "adapter", "optimizer")


def prepare_run_dir(cfg: DictConfig) -> tuple[Path, Path | None]:
    """Check the run folder before any heavy work; returns it and the checkpoint to resume from."""
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PetunerError(f"run_dir={str(run_dir)!r} cannot be created ({err.strerror})") from None
    if not os.access(run_dir, os.W_OK):
        raise PetunerError(f"run_dir={str(run_dir)!r} is not writable")
    checkpoint = latest_checkpoint(run_dir)
    if not cfg.trainer.resume:
        if checkpoint is not None:
            raise PetunerError(f"run_dir={str(run_dir)!r} already holds checkpoints: set trainer.resume=true "
                               "to continue it, or choose another run_dir")
        return run_dir, None
    if checkpoint is None:
        raise PetunerError(f"trainer.resume=true but run_dir={str(run_dir)!r} has no checkpoint")
    saved = read_config(run_dir)
    for section in RESUME_SECTIONS:
        if OmegaConf.to_container(saved[section]) != OmegaConf.to_container(cfg[section], resolve=True):
            raise PetunerError(f"trainer.resume=true but the {section} config differs from the one "
                               f"{run_dir}/{CONFIG_FILE} trained with")
    return run_dir, checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def calibration_batches(data: Any, batches: int, size: int) -> list[dict[str, torch.Tensor]]:
    """The first ``batches`` training batches in order: what an adapter's ``prepare`` may look at."""
    n = min(len(data.train), batches * size)
    return [data.collate([data.train[i] for i in range(start, min(start + size, n))]) for start in range(0, n, size)]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one run as ``cfg`` says; returns its results (also in RUN_DIR/run.json)."""
    validate(cfg)
    run_dir, checkpoint = prepare_run_dir(cfg)
    device = resolve_device(cfg.trainer.device)
    compute_dtype = resolve_precision(cfg.trainer.precision, device)
    check_optimizer_for_trainer(cfg.optimizer, cfg.trainer, compute_dtype)
    method = build_adapter(cfg.adapter)
    check_data_cfg(cfg.data, cfg.model.task, context_length(model_config(cfg.model)))

    skeleton = load_model(cfg.model, meta=True)  # structure only: checks targets in milliseconds
    heads = head_modules(skeleton, cfg.model.task)
    method.select_targets(skeleton, exclude=heads)

    tokenizer = load_tokenizer(cfg.model)
    data = build_data(cfg.data, tokenizer, cfg.model.task)
    log.info("data:\n%s", describe(data, tokenizer, examples=1))

    model = load_model(cfg.model, data.num_labels)
    method.prepare(model, calibration_batches(data, method.calibration_batches(), cfg.trainer.batch_size))
    seed_everything(cfg.trainer.seed)  # adapter init, then dropout: one seeded stream
    injection = inject(model, method, heads)
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.3f%%); adapter=%s on %d modules", f"{trainable:,}",
             f"{total:,}", 100 * trainable / total, method.name, len(injection.targets))
    model.to(device)
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False  # training never reads the KV cache back; building it only costs memory
    if cfg.trainer.labelled_logits and cfg.model.task == "causal_lm":
        keep_labelled_logits(model)
    if cfg.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    optimizer = build_optimizer(model, cfg.optimizer, device, exclude=method.own_optimizer_parameters(model))
    info: dict[str, Any] = {
        "petuner_version": __version__, "run_dir": str(run_dir.resolve()), "base_model": model_source(cfg.model),
        "task": cfg.model.task, "data_kind": data.kind, "label_names": data.label_names,
        "targets": injection.targets, "head_modules": injection.head_modules,
        "trainable_parameters": trainable, "total_parameters": total,
        "device": str(device), "compute_dtype": str(compute_dtype or torch.float32).removeprefix("torch."),
        "train_examples": len(data.train), "eval_examples": len(data.eval), "data": data.report,
    }
    if report := method.report():
        info["adapter_report"] = report
    atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(run_dir / RUN_FILE, info)

    metrics = MetricsLog(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
                         resume_step=_checkpoint_step(checkpoint))
    scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps(cfg.trainer, len(data.train)))
    memory = MemoryHook()  # last: it sees the gradients the optimizer will use
    scaler = grad_scaler(device, compute_dtype)
    guard = NonFiniteGuard(cfg.trainer.on_nonfinite, check_grads=not scaler.is_enabled())  # first: may veto
    loop = Loop(model=model, data=data, optimizer=optimizer, scheduler=scheduler,
                scaler=scaler, hooks=[guard, *method.hooks(model), memory], cfg=cfg.trainer,
                device=device, compute_dtype=compute_dtype, run_dir=run_dir, metrics=metrics)
    start = 0
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, model, optimizer, scheduler, loop.scaler, loop.hooks)
        log.info("resumed from %s (step %d)", checkpoint, start)
    reset_peak_memory(device)
    try:
        results = loop.train(start)
        results.update(memory.report(model, optimizer))
        metrics.log({k: v for k, v in results.items() if k.startswith("memory/")}, loop.total_steps())
        metrics.summary(results)
    finally:
        metrics.close()
    with atomic_file(run_dir / ADAPTER_FILE) as tmp:
        save_tensors(adapter_state_dict(model), tmp)
    write_manifest(run_dir, {"kind": "run"}, files=[ADAPTER_FILE, CONFIG_FILE])
    info.update({"results": results, "steps": loop.total_steps()})
    atomic_write_json(run_dir / RUN_FILE, info)
    log.info("done: %s", "  ".join(f"{k}={v:.4g}" for k, v in results.items()))
    log.info("saved run to %s", run_dir)
    if cfg.get("export"):
        from petuner.export import export

        out = export(run_dir, cfg.export, run_dir / f"export-{cfg.export}", force=True)
        info["export"] = str(out)
    return info


def _checkpoint_step(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name.split("-")[1]) if checkpoint is not None else None
