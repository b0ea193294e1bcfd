"""LQ-LoRA (Guo et al., ICLR 2024): each target W ≈ Q + L1·L2; Q frozen and NF-quantized, L1·L2 the LoRA.

Per target matrix, ``petuner.quant.lq_decompose`` finds Q (k-bit block-wise NormalFloat, double-quantized
scales, stored packed: the memory really shrinks; dequantized in the forward) and L1 (out×r), L2 (r×in).
The LoRA factors start at B = L1/√s, A = L2/√s, so s·B·A = L1·L2 and the adapted model starts at
Q + L1·L2 ≈ W. Only the target modules are quantized (the paper's setting: ``all-linear``). Options
beyond LoRA's:

- ``bits`` / ``block_size``: the NormalFloat config when no budget is given;
- ``iterations``: the most alternations per matrix (the best iterate is kept);
- ``fisher``: weight the decomposition by a diagonal Fisher (mean squared gradients over
  ``calibration_batches`` training batches; rows by sqrt(mean_j F), columns by sqrt(mean_i F));
- ``budget_bits``: average bits per quantized weight (scales included, the 16-bit low-rank part not);
  every matrix is decomposed at 2, 3, 4 and 8 bits and an integer linear program (scipy's ``milp``)
  picks one config per matrix minimising the total error within the budget.

Decompositions are cached under ``$PETUNER_CACHE/lq_lora`` by a hash of the weight, its Fisher weights
and the config, so a second run (and ``petuner.load``) does not redo them. The Fisher weights of a
model are cached too: ``petuner.load`` has no data, and uses the ones the training run computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from petuner.adapters.base import AdapterSchema, Injection
from petuner.adapters.capabilities import PreparesFromData, QuantizedBase
from petuner.adapters.conv1d import refuse_conv1d
from petuner.adapters.lora import LoRABase, LoRABaseSchema
from petuner.adapters.quantized_base import QuantizedBaseLoRA
from petuner.adapters.registry import register_adapter
from petuner.adapters.targets import match_targets
from petuner.assets import cache_dir
from petuner.errors import ConfigError, PetunerError
from petuner.io import atomic_file, save_tensors
from petuner.quant import (
    BITS,
    BLOCK_SIZES,
    Decomposition,
    NFLinear,
    NFQuantized,
    QuantConfig,
    allocate,
    grid,
    lq_decompose,
    weighted_error,
)
from petuner.quant.lq import SVD_OVERSAMPLE, SVD_POWER_ITERATIONS
from petuner.quant.nf import ABSMAX_GROUP
from petuner.schema import choice, flag, number

log = logging.getLogger(__name__)
LOW_RANK_BITS = 16  # the paper counts L1, L2 at 16 bits
_VERSION = 2  # bump when the decomposition's algorithm changes: old cache entries no longer match
GRIDS = ("paper", "bits_blocks", "bits")


def decomposition_cache() -> Path:
    return cache_dir() / "lq_lora"


class LQLoRALinear(QuantizedBaseLoRA):
    def __init__(self, base_layer: nn.Linear, decomposition: Decomposition, alpha: float, dropout: float = 0.0,
                 scaling: str = "standard") -> None:
        r = decomposition.L1.shape[1]
        super().__init__(base_layer, NFLinear(decomposition.q, base_layer.bias), r=r, alpha=alpha, dropout=dropout,
                         scaling=scaling)
        root = math.sqrt(self.scaling)
        with torch.no_grad():
            self.lora_B.weight.copy_(decomposition.L1 / root)
            self.lora_A.weight.copy_(decomposition.L2 / root)

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.dequantized_weight()

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        """The packed quantized base too: a run folder reloads without recomputing the decomposition."""
        return {**super().adapter_buffers(), **{f"base_layer.{n}": b for n, b in self.base_layer.named_buffers()}}


# --- cache and Fisher --------------------------------------------------------------------------

def _digest(*tensors: torch.Tensor | None, extra: Any = None) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def cached_decomposition(weight: torch.Tensor, rank: int, config: QuantConfig, iterations: int,
                         fisher: torch.Tensor | None, fisher_digest: str = "") -> Decomposition:
    """``lq_decompose``, computed once per (weight, Fisher, config) and then read from the cache."""
    key = {"rank": rank, "bits": config.bits, "block_size": config.block_size, "group_size": config.group_size,
           "iterations": iterations, "version": _VERSION, "svd": [SVD_OVERSAMPLE, SVD_POWER_ITERATIONS],
           "fisher": fisher_digest}
    path = decomposition_cache() / f"dec-{_digest(weight, extra=key)}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        q = NFQuantized(t["codes"], t["absmax_codes"], t["scales"], tuple(weight.shape), config.bits,
                        config.block_size, config.group_size)
        return Decomposition(q=q, L1=t["L1"], L2=t["L2"], errors=t["errors"].tolist(), best=int(t["best"]))
    dec = lq_decompose(weight, rank, config.bits, config.block_size, iterations, fisher, config.group_size)
    with atomic_file(path) as tmp:
        save_tensors({"codes": dec.q.codes, "absmax_codes": dec.q.absmax_codes, "scales": dec.q.scales,
                      "L1": dec.L1, "L2": dec.L2, "errors": torch.tensor(dec.errors, dtype=torch.float64),
                      "best": torch.tensor(dec.best)}, tmp)
    return dec


def split_examples(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A collated batch as batch-1 batches (tensors sliced along their first dimension)."""
    size = int(batch["input_ids"].shape[0])
    return [{k: v[i:i + 1] if torch.is_tensor(v) and v.dim() and v.shape[0] == size else v for k, v in batch.items()}
            for i in range(size)]


def empirical_fisher(model: nn.Module, weights: Sequence[torch.Tensor],
                     calibration: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
    """The empirical diagonal Fisher of each weight: the mean over examples of the squared per-example gradient.

    A batch-1 loop (each example's loss is the mean over its own labelled tokens); examples without a
    finite loss (no labelled token) are left out.
    """
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    flags, was_training, count = [w.requires_grad for w in weights], model.training, 0
    model.eval()
    try:
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            for example in (e for batch in calibration for e in split_examples(batch)):
                loss = model(**example).loss
                if not torch.isfinite(loss):
                    continue
                for total, g in zip(sums, torch.autograd.grad(loss, weights), strict=True):
                    total += g.float().square()
                count += 1
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    if not count:
        raise PetunerError("adapter.fisher=true: no calibration example has a labelled token")
    return [total / count for total in sums]


# --- the method --------------------------------------------------------------------------------

@dataclass
class LQLoRASchema(LoRABaseSchema):
    name: str = "lq_lora"
    bits: int = choice(4, BITS)  # NormalFloat bits when budget_bits is null
    block_size: int = choice(64, BLOCK_SIZES)  # weights per absmax
    iterations: int = number(10, integer=True)  # most alternations SVD ↔ quantize per matrix
    fisher: bool = flag(False)  # weight the decomposition by the empirical diagonal Fisher of calibration batches
    calibration_batches: int = number(8, integer=True)
    budget_bits: float | None = None  # average bits per quantized weight: per-matrix configs chosen by an ILP
    allocation_grid: str = choice("paper", GRIDS)  # the ILP's candidates: paper (bits × block × 2nd-level), ...


@register_adapter
class LQLoRA(LoRABase, QuantizedBase, PreparesFromData):
    name = "lq_lora"
    schema: ClassVar[type[AdapterSchema]] = LQLoRASchema

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        c = self.cfg
        cheapest = min(self.configs(), key=lambda q: q.bits_per_param)
        budget = c.budget_bits
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or budget < cheapest.bits_per_param):
            raise ConfigError(f"adapter.budget_bits={budget!r}: must be null or a number >= "
                              f"{cheapest.bits_per_param:.4g} (every matrix at {cheapest.bits} bits, blocks of "
                              f"{cheapest.block_size}, {cheapest.group_size} blocks per scale)")
        self._fisher: dict[str, torch.Tensor] | None = None
        self._restored: dict[str, QuantConfig] | None = None
        self._plan: dict[str, tuple[nn.Module, Decomposition, QuantConfig]] = {}
        self._report: dict[str, Any] = {}

    def switch_off_refusal(self) -> str:
        return ("adapter=lq_lora starts from non-zero factors over a quantized residual: switched off it is the "
                "residual, not the model training starts from, so it cannot be the reference (use adapter=qlora)")

    @property
    def allocation_grid(self) -> str:
        return self.cfg.allocation_grid

    def select_targets(self, model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
        """LoRA's targets; Conv1D layers refused (the decomposition reads the stored weight before injection)."""
        targets = super().select_targets(model, exclude)
        refuse_conv1d(model, targets, "adapter=lq_lora")
        return targets

    def configs(self) -> list[QuantConfig]:
        """The candidate quantization configs of every matrix: the grid with a budget, else bits/block_size."""
        c = self.cfg
        if c.budget_bits is None:
            return [QuantConfig(c.bits, c.block_size)]
        if self.allocation_grid == "bits":
            return [QuantConfig(b, c.block_size) for b in BITS]
        return [q for q in grid() if self.allocation_grid == "paper" or q.group_size == ABSMAX_GROUP]

    def calibration_batches(self) -> int:
        return int(self.cfg.calibration_batches) if self.cfg.fisher else 0

    def prepare(self, model: nn.Module, calibration: Sequence[dict[str, torch.Tensor]],
                exclude: Sequence[str] = ()) -> None:
        """Decompose every target (with ``fisher``, weighted by the empirical diagonal Fisher of ``calibration``)
        and allocate the configs; ``make_layer`` then uses the plan. A restored run (``restore``) skips both."""
        if self.cfg.fisher and self._restored is None:
            if not calibration:
                raise PetunerError("adapter.fisher=true needs calibration batches from the training data")
            names = match_targets(model, self.cfg.target_modules, exclude)
            fishers = empirical_fisher(model, [model.get_submodule(n).weight for n in names], calibration)
            self._fisher = dict(zip(names, fishers, strict=True))
            log.info("lq_lora: empirical diagonal Fisher from %d calibration batches", len(calibration))
        self._decompose(model, self.select_targets(model, exclude))

    def apply(self, model: nn.Module, head_modules: Sequence[str] = ()) -> Injection:
        """LoRA's injection over the decomposed targets (prepared here when a caller did not: ``petuner.load``)."""
        targets = self.select_targets(model, head_modules)
        if [n for n in self._plan] != targets or any(m is not model.get_submodule(n)
                                                     for n, (m, _, _) in self._plan.items()):
            self.prepare(model, (), head_modules)
        return super().apply(model, head_modules)

    def restore(self, report: dict[str, Any]) -> None:
        """Rebuild from a run's report (its per-matrix configs) instead of decomposing: the packed Q and the
        LoRA factors then load from the run's saved adapter state."""
        self._restored = {name: QuantConfig(m["bits"], m["block_size"], m.get("group_size", ABSMAX_GROUP))
                          for name, m in report.get("matrices", {}).items()}
        self._report = report

    def _decompose(self, model: nn.Module, targets: list[str]) -> None:
        c = self.cfg
        modules = [model.get_submodule(n) for n in targets]
        if self._restored is not None:
            self._plan = {n: (m, self._placeholder(n, m), self._restored[n]) for n, m in zip(targets, modules,
                                                                                               strict=True)}
            return
        configs = self.configs()
        decs = []
        progress = tqdm(zip(targets, modules, strict=True), total=len(targets), desc="lq_lora: decompose",
                        unit="matrix", disable=None)
        for n, m in progress:  # one matrix at a time, on the training device
            fisher = self._fisher[n] if self._fisher else None
            digest = _digest(fisher) if fisher is not None else ""
            weight = m.weight if self.device is None else m.weight.to(self.device)
            decs.append([cached_decomposition(weight, c.r, q, c.iterations, fisher, digest) for q in configs])
        sizes = [m.weight.numel() for m in modules]
        if c.budget_bits is not None:
            bits = [[n * q.bits_per_param for q in configs] for n in sizes]
            picks = allocate([[d.error for d in row] for row in decs], bits, c.budget_bits * sum(sizes))
        else:
            picks = [0] * len(targets)
        self._plan = {n: (m, row[i], configs[i]) for n, m, row, i in zip(targets, modules, decs, picks, strict=True)}
        self._report = self._summary(sizes)
        self._fisher = None  # as large as the weights; the plan holds what is needed from it
        log.info("lq_lora: %s; %.3f bits/param quantized + %.3f low-rank = %.3f; quantized weights hold %s bytes",
                 ", ".join(f"{k}-bit ×{v}" for k, v in
                           sorted(Counter(q.bits for _, _, q in self._plan.values()).items())),
                 self._report["quantized_bits_per_param"], self._report["low_rank_bits_per_param"],
                 self._report["bits_per_param"], f"{self._report['quantized_bytes']:,}")

    def _placeholder(self, name: str, module: nn.Module) -> Decomposition:
        """Storage of the right sizes for ``name``'s saved config, filled when the run's adapter state loads."""
        if self._restored is None or name not in self._restored:
            raise PetunerError(f"lq_lora: the run's report has no quantization config for {name}")
        out, inp = module.weight.shape
        zero = torch.zeros((), dtype=torch.float32)
        return Decomposition(q=NFQuantized.empty((out, inp), self._restored[name]), L1=zero.expand(out, self.cfg.r),
                             L2=zero.expand(self.cfg.r, inp), errors=[float("nan")], best=0)

    def _summary(self, sizes: list[int]) -> dict[str, Any]:
        total = sum(sizes)
        fisher = self._fisher or {}
        per_matrix = {n: {"bits": q.bits, "block_size": q.block_size, "group_size": q.group_size, "error": d.error,
                          "relative_error": math.sqrt(d.error / weighted_error(m.weight.detach(), fisher.get(n))),
                          "iterations_run": len(d.errors), "best_iterate": d.best}
                      for n, (m, d, q) in self._plan.items()}
        quantized = sum(n * q.bits_per_param for n, (_, _, q) in zip(sizes, self._plan.values(), strict=True)) / total
        low_rank = sum(LOW_RANK_BITS * self.cfg.r * sum(m.weight.shape) for m, _, _ in self._plan.values()) / total
        return {"matrices": per_matrix, "quantized_bits_per_param": quantized, "low_rank_bits_per_param": low_rank,
                "bits_per_param": quantized + low_rank,
                "quantized_bytes": sum(d.q.nbytes() for _, d, _ in self._plan.values()), "parameters": total}

    def make_layer(self, base_layer: nn.Linear) -> LQLoRALinear:
        found = [n for n, (m, _, _) in self._plan.items() if m is base_layer]
        if not found:
            raise PetunerError("lq_lora: make_layer on a layer select_targets did not decompose")
        _, decomposition, _ = self._plan.pop(found[0])  # no reference to the full-precision layer remains
        c = self.cfg
        return LQLoRALinear(base_layer, decomposition, alpha=c.alpha, dropout=c.dropout, scaling=c.scaling)

    def report(self) -> dict[str, Any]:
        return self._report

    def export_note(self, fmt: str) -> str:
        if fmt == "peft":
            return ("These LoRA factors belong to LQ-LoRA's quantized base Q (W ≈ Q + s·B·A at initialisation), "
                    "not to the original weights: applied to the original model they count the low-rank part "
                    "twice. Rebuild the quantized model with `petuner.load(<run folder>)` (the run folder holds "
                    "the packed Q of every target), or use the merged export.")
        return ("The base was LQ-LoRA-quantized during training: this model holds the dequantized base Q "
                "with the adapter merged, in full precision.")
