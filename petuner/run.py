"""Compose one run: config → model → adapter → data → optimizer → loop → saved run → export.

Everything cheap is checked first (the config, the model's config and context, the adapter's
targets on a weightless meta-device copy of the model), so a bad value fails in seconds, before the
weights load and long before training starts.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from petuner import __version__
from petuner.adapters import Injection, adapter_state_dict, inject
from petuner.adapters.capabilities import ComposesRuns, OwnsOptimizerParameters, PreparesFromData, QuantizedBase
from petuner.config import validate
from petuner.continued import load_starting_weights
from petuner.data import build_data
from petuner.data.packing import attend_within_examples, check_packing_exact, pack_bundle
from petuner.data.report import describe
from petuner.data.schema import check_max_length
from petuner.errors import PetunerError
from petuner.families import check_family
from petuner.io import (
    ADAPTER_FILE,
    CONFIG_FILE,
    RUN_FILE,
    atomic_file,
    atomic_write_json,
    atomic_write_text,
    save_tensors,
)
from petuner.manifest import write_manifest
from petuner.models import context_length, head_modules, load_model, load_tokenizer, model_config, model_source
from petuner.objectives.reference import build_reference, precompute_reference
from petuner.optim import build_optimizer, build_scheduler, check_optimizer_for_trainer
from petuner.run_folder import read_config
from petuner.train import distributed
from petuner.train.abort import Interrupted, StopOnSignal
from petuner.train.best import BestCheckpoint
from petuner.train.checkpoint import check_world_size, latest_checkpoint, load_checkpoint, save_checkpoint
from petuner.train.compile import compile_model
from petuner.train.device import grad_scaler, reset_peak_memory, resolve_device, resolve_precision
from petuner.train.guard import NonFiniteGuard
from petuner.train.labelled_logits import install_output_path
from petuner.train.lean_swiglu import lean_swiglu
from petuner.train.logging import MetricsLog
from petuner.train.loop import Loop, total_steps
from petuner.train.memory import MemoryHook
from petuner.train.objective import Objective
from petuner.train.precision import adapter_dtype, check_precision, dtype_report, full_finetuning, upcast_trainable
from petuner.train.resume import check_length, check_unchanged, follow_schedule
from petuner.train.router_loss import route_losses

log = logging.getLogger(__name__)


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
    check_world_size(checkpoint)
    check_unchanged(read_config(run_dir), cfg, run_dir)
    return run_dir, checkpoint


def check_resume_length(cfg: DictConfig, run_dir: Path, checkpoint: Path | None, train_rows: int) -> None:
    """A resumed run's length against its checkpoint (needs the data: ``trainer.epochs`` counts its rows)."""
    if checkpoint is not None:
        saved = read_config(run_dir).trainer
        check_length(_checkpoint_step(checkpoint), total_steps(cfg.trainer, train_rows),
                     total_steps(saved, train_rows), str(cfg.optimizer.schedule))


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


@dataclass
class Setup:
    """A run ready to train: everything checked, built, and on its device."""

    model: torch.nn.Module
    method: Any
    data: Any
    injection: Injection
    device: torch.device
    compute_dtype: torch.dtype | None
    run_dir: Path
    checkpoint: Path | None
    objective: Objective


def install_training_paths(model: torch.nn.Module, trainer: DictConfig, task: str) -> None:
    """What ``trainer`` puts between the adapted model and the loss: the output path (labelled logits, chunked
    loss), a mixture of experts' router loss, the lean SwiGLU, checkpointing, compilation. One function, so tests
    train through what runs do."""
    install_output_path(model, trainer, task)
    route_losses(model)
    if trainer.lean_swiglu:
        log.info("lean SwiGLU: %d MLPs save two of their three activations", lean_swiglu(model))
    if trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if trainer.compile:
        compile_model(model)


def _composed_sources(cfg: DictConfig, method: Any, *, read: bool) -> None:
    """A method built over earlier runs (aTLAS): check they share this run's base (one line if not), and with
    ``read`` hand their updates over."""
    if not isinstance(method, ComposesRuns):
        return
    from petuner.merge import check_sources, read_sources

    if read:
        method.compose(read_sources(cfg, method.sources()))
    else:
        check_sources(cfg, method.sources())


def _join_and_check(cfg: DictConfig, plan: Any) -> tuple[Path, Path | None, torch.device, torch.dtype | None]:
    """Join the process group, prepare the run folder (rank 0 writes), pick the device and precision, and check
    what needs them: still before any data is read or weights are loaded."""
    distributed.init_from_env()
    distributed.check_launch(cfg)
    with open_dict(cfg):  # one folder for all ranks, even if their clocks named Hydra's default differently
        cfg.run_dir = distributed.broadcast_object(str(cfg.run_dir))
    if not distributed.is_writer():
        logging.getLogger().setLevel(logging.WARNING)  # one voice: rank 0's
    with distributed.writer_first():
        run_dir, checkpoint = prepare_run_dir(cfg)
    device = resolve_device(cfg.trainer.device)
    compute_dtype = resolve_precision(cfg.trainer.precision, device)
    check_optimizer_for_trainer(cfg.optimizer, cfg.trainer, compute_dtype)
    plan.method.device = device  # decompositions and quantization run where the model will train
    check_precision(cfg.model, plan.method, compute_dtype)
    config = model_config(cfg.model)
    check_max_length(plan.data, context_length(config))
    check_family(cfg.model, config, bool(cfg.data.packing))
    return run_dir, checkpoint, device, compute_dtype


def _adapt(model: torch.nn.Module, method: Any, heads: list[str], cfg: DictConfig,
           compute_dtype: torch.dtype | None) -> Injection:
    """Inject the adapter (seeded), start from ``init_from``'s weights if set, and upcast what trains."""
    seed_everything(cfg.trainer.seed)  # adapter init, then dropout: one seeded stream
    injection = inject(model, method, heads, adapter_dtype=adapter_dtype(cfg.model))
    if cfg.get("init_from"):
        load_starting_weights(model, str(cfg.init_from))
        log.info("starting from the adapter of %s", cfg.init_from)
    if compute_dtype is not None and not full_finetuning(method):
        upcast_trainable(model, adapter_dtype(cfg.model))  # heads, biases: autocast handles the mixed dtypes
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.3f%%); adapter=%s on %d modules", f"{trainable:,}",
             f"{total:,}", 100 * trainable / total, method.name, len(injection.targets))
    return injection


def set_up(cfg: DictConfig) -> Setup:
    """Check everything cheap first (config, run folder, targets on a weightless copy), then load and adapt."""
    plan = validate(cfg)
    _composed_sources(cfg, plan.method, read=False)  # aTLAS's sources share this base, before anything is written
    run_dir, checkpoint, device, compute_dtype = _join_and_check(cfg, plan)
    method = plan.method
    _composed_sources(cfg, method, read=True)
    skeleton = load_model(cfg.model, meta=True)  # structure only: checks targets in milliseconds
    heads = head_modules(skeleton, cfg.model.task)
    method.select_targets(skeleton, exclude=heads)

    tokenizer = load_tokenizer(cfg.model)
    data = build_data(plan.data, tokenizer, cfg.model.task, check_kind=plan.objective.check_data_kind)
    plan.objective.prepare_data(data, tokenizer, int(cfg.data.max_length))
    if cfg.data.packing:
        data = pack_bundle(data, tokenizer, cfg.data.max_length, cfg.data.split_seed)
    log.info("data:\n%s", describe(data, tokenizer, examples=1))
    check_resume_length(cfg, run_dir, checkpoint, len(data.train))

    model = load_model(cfg.model, data.num_labels)
    if cfg.data.packing:
        attend_within_examples(model)
    if isinstance(method, PreparesFromData):
        batches = calibration_batches(data, method.calibration_batches(), cfg.trainer.batch_size)
        with distributed.writer_first():  # a cached preparation (LQ-LoRA's decomposition) is computed once
            method.prepare(model, batches, exclude=heads)
    injection = _adapt(model, method, heads, cfg, compute_dtype)
    model.to(device)
    if cfg.data.packing:
        check_packing_exact(model)  # a family no table lists as leaking is proven not to, on these weights
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False  # training never reads the KV cache back; building it only costs memory
    install_training_paths(model, cfg.trainer, cfg.model.task)
    if plan.objective.needs_reference:  # after the paths: the reference scores through the same output path
        set_reference(plan.objective, model, method, data, cfg, heads, device, compute_dtype)
    return Setup(model=model, method=method, data=data, injection=injection, device=device,
                 compute_dtype=compute_dtype, run_dir=run_dir, checkpoint=checkpoint, objective=plan.objective)


def set_reference(objective: Any, model: torch.nn.Module, method: Any, data: Any, cfg: DictConfig, heads: list[str],
                  device: torch.device, compute_dtype: torch.dtype | None) -> None:
    """A preference objective's reference: precomputed over the data now, or a model to run at every step."""
    if objective.cfg.get("precompute_reference"):
        log.info("precomputing the reference's log-probabilities over %d + %d rows", len(data.train), len(data.eval))
        precompute_reference(model, data, objective.reference_scores, cfg.trainer.eval_batch_size, device,
                             compute_dtype)
    else:
        objective.reference = build_reference(model, method, bool(cfg.get("init_from")), heads)


def run_info(cfg: DictConfig, s: Setup) -> dict[str, Any]:
    """What training decided, for run.json."""
    trainable, total = count_parameters(s.model)
    info: dict[str, Any] = {
        "petuner_version": __version__, "run_dir": str(s.run_dir.resolve()), "base_model": model_source(cfg.model),
        "task": cfg.model.task, "data_kind": s.data.kind, "label_names": s.data.label_names,
        "targets": s.injection.targets, "head_modules": s.injection.head_modules,
        "trainable_parameters": trainable, "total_parameters": total,
        "device": str(s.device), **dtype_report(s.model, s.compute_dtype),
        # examples as examples; under data.packing also the rows they were packed into (what a batch counts)
        **{k: s.data.report[k] for k in ("train_examples", "eval_examples", "train_rows", "eval_rows")
           if k in s.data.report},
        "processes": distributed.world_size(), "data": s.data.report,
    }
    if isinstance(s.method, (QuantizedBase, ComposesRuns)):
        info["adapter_report"] = s.method.report()
    return info


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one run as ``cfg`` says; returns its results (also in RUN_DIR/run.json)."""
    s = set_up(cfg)
    model, run_dir, device, compute_dtype = s.model, s.run_dir, s.device, s.compute_dtype
    trained = distributed.wrap(model, device, cfg.trainer.strategy, compute_dtype)
    own = s.method.own_optimizer_parameters(model) if isinstance(s.method, OwnsOptimizerParameters) else []
    optimizer = build_optimizer(model, cfg.optimizer, device, exclude=own, heads=s.injection.head_modules)
    info = run_info(cfg, s)
    log.info("global batch %d examples = %d process(es) x %d per micro-batch x grad_accum %d, per optimizer "
             "step %d", cfg.trainer.batch_size, distributed.world_size(),
             math.ceil(cfg.trainer.batch_size / distributed.world_size()), cfg.trainer.grad_accum,
             cfg.trainer.batch_size * cfg.trainer.grad_accum)
    if distributed.is_writer():
        atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(run_dir / RUN_FILE, info)

    metrics = MetricsLog(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
                         resume_step=_checkpoint_step(s.checkpoint))
    scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps(cfg.trainer, len(s.data.train)))
    memory = MemoryHook()  # last: it sees the gradients the optimizer will use
    scaler = grad_scaler(device, compute_dtype)
    guard = NonFiniteGuard(cfg.trainer.on_nonfinite, scaled=scaler.is_enabled())  # first: may veto
    stop = StopOnSignal()  # first: a SIGTERM ends the run at a step boundary, before any hook draws
    best = BestCheckpoint(run_dir, cfg.objective, cfg.trainer.early_stopping_patience,
                          cfg.trainer.early_stopping_min_delta, enabled=bool(cfg.trainer.eval_every))
    loop = Loop(model=model, data=s.data, optimizer=optimizer, scheduler=scheduler,
                scaler=scaler, hooks=[stop, guard, *s.method.hooks(model), best, memory], cfg=cfg.trainer,
                device=device, compute_dtype=compute_dtype, run_dir=run_dir, metrics=metrics, trained=trained,
                objective=s.objective)
    distributed.seed_rank(cfg.trainer.seed)  # after every seeded draw all ranks share: dropout differs per rank
    start = 0
    if s.checkpoint is not None:
        start = load_checkpoint(s.checkpoint, model, optimizer, scheduler, loop.scaler, loop.hooks)
        follow_schedule(scheduler)  # the rates of this run's length, which may differ from the checkpoint's
        log.info("resumed from %s (step %d)", s.checkpoint, start)
    reset_peak_memory(device)
    try:
        results = train_until_stopped(loop, stop, start)
        results.update(memory.report(model, optimizer))
        results.update(best.report())
        steps = int(results.get("early_stopping/step", loop.total_steps()))
        metrics.log({k: v for k, v in results.items() if k.startswith("memory/")}, steps)
        metrics.summary(results)
    finally:
        metrics.close()
    info.update({"results": results, "steps": steps})
    weights = distributed.gathered(adapter_state_dict(model))
    if distributed.is_writer():
        save_run(run_dir, weights, info, cfg.get("export"))
    distributed.barrier()
    return info


def train_until_stopped(loop: Loop, stop: StopOnSignal, start: int) -> dict[str, float]:
    """``loop.train``; on SIGTERM, a checkpoint of the last finished step, then one line (exit status 2)."""
    try:
        with stop.installed():
            return loop.train(start)
    except Interrupted as interrupted:
        path = save_checkpoint(loop.run_dir, interrupted.step, loop.model, loop.optimizer, loop.scheduler,
                               loop.scaler, loop.hooks, keep=loop.cfg.keep_checkpoints)
        raise PetunerError(f"{interrupted}: checkpoint {path} kept; continue it with trainer.resume=true "
                           f"run_dir={loop.run_dir}") from None


def save_run(run_dir: Path, weights: dict[str, torch.Tensor], info: dict[str, Any],
             export_format: str | None) -> None:
    """The finished run's files (and export, if asked): rank 0's job."""
    with atomic_file(run_dir / ADAPTER_FILE) as tmp:
        save_tensors(weights, tmp)
    write_manifest(run_dir, {"kind": "run"}, files=[ADAPTER_FILE, CONFIG_FILE])
    atomic_write_json(run_dir / RUN_FILE, info)
    log.info("done: %s", "  ".join(f"{k}={v:.4g}" for k, v in info["results"].items()))
    log.info("saved run to %s", run_dir)
    if export_format:
        from petuner.export import export

        info["export"] = str(export(run_dir, export_format, run_dir / f"export-{export_format}", force=True))


def _checkpoint_step(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name.split("-")[1]) if checkpoint is not None else None
