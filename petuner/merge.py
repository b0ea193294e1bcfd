"""``petuner merge RUN_A RUN_B ... --method M --weights ... [--density D] --out RUN``: several runs on one base as
one new run folder (``adapter=merged``), which loads, generates, evaluates and exports like any other.

Methods, per adapted matrix (a module only some runs adapt counts as a zero update in the others):

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``: peft's ``add_weighted_adapter`` — its merge functions
  (``peft.utils.merge_utils``) applied to the A factors with weights sign·√|w·s| and to the B factors with
  √|w·s|, when every run's update is a plain LoRA of one rank. Otherwise (DoRA, a non-LoRA method, differing
  ranks) the same function acts on the dense updates ΔW_i with weights w_i, as mergekit does.
- ``cat``, ``task_arithmetic``: Σ w_i ΔW_i exactly (the factors stacked: rank Σ r_i for LoRA inputs).
- ``svd``: Σ w_i ΔW_i truncated to ``rank`` (default: the largest input rank) by SVD, B = U·S, A = Vh as peft.

Each run's scale s is its own (rsLoRA's α/√r, a DyLoRA's, ...) and DoRA's ΔW includes its magnitudes: peft's
``add_weighted_adapter`` instead copies the first adapter's ``use_rslora``/``use_dora`` into the result (the
rsLoRA merge comes out scaled by √r, the DoRA one gets a fresh magnitude), peft#3761. A dense result is stored
as its exact SVD (every singular value above float noise), so nothing but ``svd`` truncates. DARE's random
drop runs under ``seed`` (peft draws it from torch's global generator; here a forked one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from petuner.choices import MERGE_METHODS
from petuner.errors import PetunerError

log = logging.getLogger(__name__)
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
FACTOR_METHODS = ("linear", *DENSITY_METHODS)
Update = tuple[torch.Tensor, torch.Tensor, float] | torch.Tensor  # (A, B, s) of a plain LoRA, or a dense ΔW


def base_identity(cfg: Any, info: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two runs' base models the same: the weights' source, the task, the random init and its seed."""
    random_init = cfg.model.get("random_init")
    return (info.get("base_model"), str(cfg.model.get("name_or_path")), cfg.model.task,
            None if random_init is None else (OmegaConf.to_yaml(random_init), cfg.model.get("init_seed")))


def check_same_base(runs: Sequence[Path | str], what: str, first: tuple[Any, ...] | None = None,
                    first_name: str | None = None) -> list[tuple[Any, dict[str, Any]]]:
    """Each run's (config, run.json), after checking they share one base model (``first``'s, by default the first
    run's); one line if not."""
    from petuner.run_folder import read_config, read_info

    found = [(read_config(r), read_info(r)) for r in runs]
    first = first or base_identity(*found[0])
    for run, (cfg, info) in zip(runs, found, strict=True):
        if base_identity(cfg, info) != first:
            theirs = info.get("base_model") or "a random init"
            raise PetunerError(f"{what}: {run} was trained on another base ({theirs}, task {cfg.model.task}) than "
                               f"{first_name or runs[0]} ({first[0] or 'a random init'}, task {first[2]}); "
                               "use runs of one base")
    return found


def check_sources(cfg: Any, runs: Sequence[str]) -> None:
    """aTLAS's sources are run folders on ``cfg``'s base model (one line naming the first that is not)."""
    from petuner.models import model_source

    check_same_base(runs, "adapter.sources", base_identity(cfg, {"base_model": model_source(cfg.model)}),
                    "this run")


def read_sources(cfg: Any, runs: Sequence[str]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """aTLAS's sources: each run's (A, B) per module (scale folded into B; an exact SVD where its update is no
    LoRA), checked to share ``cfg``'s base model."""
    check_sources(cfg, runs)
    factors = []
    for run in runs:
        updates, _ = layer_updates(run)
        factors.append({name: (u[0], u[2] * u[1]) if isinstance(u, tuple) else exact_factors(u)
                        for name, u in updates.items()})
    return factors


def check_merge(runs: Sequence[Path | str], method: str, weights: Sequence[float] | None, density: float | None,
                out: Path, force: bool) -> list[float]:
    """Every merge input checked before any weights load; returns the weights (default 1/n each)."""
    from petuner.adapters import build_adapter
    from petuner.adapters.capabilities import QuantizedBase

    if method not in MERGE_METHODS:
        raise PetunerError(f"--method {method!r}: allowed: {', '.join(MERGE_METHODS)}")
    if weights is not None and len(weights) != len(runs):
        raise PetunerError(f"--weights: {len(weights)} given for {len(runs)} runs; give one weight per run")
    if method in DENSITY_METHODS and (density is None or not 0 < density <= 1):
        raise PetunerError(f"--density {density}: --method {method} needs a density in (0, 1], the share kept")
    if method not in DENSITY_METHODS and density is not None:
        raise PetunerError(f"--density: only for --method {', '.join(DENSITY_METHODS)}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise PetunerError(f"--out {out} exists and is not an empty folder; pass --force to replace it")
    for run, (cfg, info) in zip(runs, check_same_base(runs, "petuner merge"), strict=True):
        if isinstance(build_adapter(cfg.adapter), QuantizedBase) or info.get("head_modules"):
            raise PetunerError(f"petuner merge: {run} (adapter={cfg.adapter.name}) has a quantized base or trained "
                               "heads of its own, which runs cannot share; merge runs whose only change is adapters")
    return list(weights) if weights is not None else [1.0 / len(runs)] * len(runs)


@torch.no_grad()
def layer_updates(run_dir: Path | str) -> tuple[dict[str, Update], list[str]]:
    """A run's update per adapted module (LoRA factors where its update is a plain LoRA, else ΔW, on the CPU),
    and the model's module names in order."""
    from petuner.adapters import adapter_layers
    from petuner.run_folder import load

    model = load(run_dir, tokenizer=False).model
    updates: dict[str, Update] = {}
    for name, layer in adapter_layers(model):
        view = layer.lora_view()
        if view is not None and not view.extra:
            updates[name] = (view.A.detach().float().cpu(), view.B.detach().float().cpu(), float(view.scaling))
        else:
            updates[name] = layer.weight_update().detach().float().cpu()
    return updates, [n for n, _ in model.named_modules()]


def dense(update: Update) -> torch.Tensor:
    return update if isinstance(update, torch.Tensor) else update[2] * update[1] @ update[0]


def merge_function(method: str, density: float | None) -> Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]:
    """peft's merge of task tensors with weights for ``method`` (majority sign by total, peft's default)."""
    from peft.utils import merge_utils

    return {"linear": merge_utils.task_arithmetic,
            "ties": lambda t, w: merge_utils.ties(t, w, density, "total"),
            "dare_linear": lambda t, w: merge_utils.dare_linear(t, w, density),
            "dare_ties": lambda t, w: merge_utils.dare_ties(t, w, density, "total")}[method]


def exact_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A = ``delta``: its SVD, every singular value above float noise kept."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = max(int((s > s[0] * max(delta.shape) * torch.finfo(s.dtype).eps).sum()), 1) if s.numel() else 0
    return vh[:k].contiguous(), (u[:, :k] * s[:k]).contiguous()


def merge_layer(updates: list[Update | None], weights: list[float], method: str, density: float | None,
                rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's merged (A, B) at scale 1; ``None`` marks a run that does not adapt it."""
    like = next(u for u in updates if u is not None)
    shape = dense(like).shape
    plain = [u for u in updates if isinstance(u, tuple)]
    if method in FACTOR_METHODS and len(plain) == len(updates) and len({u[0].shape[0] for u in plain}) == 1:
        signed = [w * u[2] for w, u in zip(weights, plain, strict=True)]
        wa = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in signed])
        wb = torch.tensor([math.sqrt(abs(x)) for x in signed])
        merge = merge_function(method, density)
        return merge([u[0] for u in plain], wa), merge([u[1] for u in plain], wb)
    if method in ("cat", "task_arithmetic") and len(plain) == len(updates):
        return (torch.cat([w * u[2] * u[0] for w, u in zip(weights, plain, strict=True)]),
                torch.cat([u[1] for u in plain], dim=1))
    deltas = [dense(u) if u is not None else torch.zeros(shape) for u in updates]
    if method in FACTOR_METHODS:
        return exact_factors(merge_function(method, density)(deltas, torch.tensor(weights)))
    total = sum(w * d for w, d in zip(weights, deltas, strict=True))
    if method == "svd":
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        return vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous()
    return exact_factors(total)


def merge_runs(runs: Sequence[Path | str], out: Path | str, *, method: str = "linear",
               weights: Sequence[float] | None = None, density: float | None = None, seed: int = 0,
               rank: int | None = None, force: bool = False) -> Path:
    """Merge ``runs`` into the new run folder ``out`` (see the module docstring); returns ``out``."""
    out = Path(out)
    if not runs:
        raise PetunerError("petuner merge: name at least one run folder")
    weights = check_merge(runs, method, weights, density, out, force)
    loaded = [layer_updates(r) for r in runs]
    per_run = [updates for updates, _ in loaded]
    names = [n for n in loaded[0][1] if any(n in p for p in per_run)]  # model order: peft's, DARE's draws follow it
    rank = rank or max(u[0].shape[0] if isinstance(u, tuple) else min(u.shape) for p in per_run for u in p.values())
    merged = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # DARE's drop, as peft draws it: one generator, modules in model order
        for name in names:
            merged[name] = merge_layer([p.get(name) for p in per_run], weights, method, density, rank)
    from petuner.merge_folder import write_merged_run

    meta = {"runs": [str(Path(r).resolve()) for r in runs], "method": method, "weights": weights,
            "density": density, "seed": seed, "rank": rank if method == "svd" else None}
    write_merged_run(runs[0], out, merged, meta, force=force)
    log.info("merged %d runs (%s) into %s", len(runs), method, out)
    return out
