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
    allocate,
    bits_per_param,
    lq_decompose,
    weighted_error,
)
from petuner.quant import fisher_weights as fisher_row_col
from petuner.quant.lq import SVD_OVERSAMPLE, SVD_POWER_ITERATIONS
from petuner.schema import choice, flag, number

log = logging.getLogger(__name__)
LOW_RANK_BITS = 16  # the paper counts L1, L2 at 16 bits
_VERSION = 1  # bump when the decomposition's algorithm changes: old cache entries no longer match
FisherWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]


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


# --- cache -------------------------------------------------------------------------------------

def _digest(*tensors: torch.Tensor | None, extra: Any = None) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def cached_decomposition(weight: torch.Tensor, rank: int, bits: int, block_size: int, iterations: int,
                         fisher: tuple[torch.Tensor, torch.Tensor] | None) -> Decomposition:
    """``lq_decompose``, computed once per (weight, Fisher weights, config) and then read from the cache."""
    row, col = fisher if fisher is not None else (None, None)
    config = {"rank": rank, "bits": bits, "block_size": block_size, "iterations": iterations, "version": _VERSION,
              "svd": [SVD_OVERSAMPLE, SVD_POWER_ITERATIONS]}
    path = decomposition_cache() / f"dec-{_digest(weight, row, col, extra=config)}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        q = NFQuantized(t["codes"], t["absmax_codes"], t["scales"], tuple(weight.shape), bits, block_size)
        return Decomposition(q=q, L1=t["L1"], L2=t["L2"], errors=t["errors"].tolist(), best=int(t["best"]))
    dec = lq_decompose(weight, rank, bits, block_size, iterations, row, col)
    with atomic_file(path) as tmp:
        save_tensors({"codes": dec.q.codes, "absmax_codes": dec.q.absmax_codes, "scales": dec.q.scales,
                      "L1": dec.L1, "L2": dec.L2, "errors": torch.tensor(dec.errors, dtype=torch.float64),
                      "best": torch.tensor(dec.best)}, tmp)
    return dec


def _fisher_path(model: nn.Module, names: Sequence[str]) -> Path:
    weights = [model.get_submodule(n).weight for n in names]
    return decomposition_cache() / f"fisher-{_digest(*weights, extra=list(names))}.safetensors"


# --- the method --------------------------------------------------------------------------------

@dataclass
class LQLoRASchema(LoRABaseSchema):
    name: str = "lq_lora"
    bits: int = choice(4, BITS)  # NormalFloat bits when budget_bits is null
    block_size: int = choice(64, BLOCK_SIZES)  # weights per absmax
    iterations: int = number(10, integer=True)  # most alternations SVD ↔ quantize per matrix
    fisher: bool = flag(False)  # weight the decomposition by a diagonal Fisher from calibration batches
    calibration_batches: int = number(8, integer=True)
    budget_bits: float | None = None  # average bits per quantized weight: per-matrix bits chosen by an ILP


@register_adapter
class LQLoRA(LoRABase, QuantizedBase, PreparesFromData):
    name = "lq_lora"
    schema: ClassVar[type[AdapterSchema]] = LQLoRASchema

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        c = self.cfg
        lowest = bits_per_param(min(BITS), c.block_size)
        budget = c.budget_bits
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or budget < lowest):
            raise ConfigError(f"adapter.budget_bits={budget!r}: must be null or a number >= {lowest:.4g} "
                              f"(every matrix at {min(BITS)} bits with block_size={c.block_size})")
        self._fisher: FisherWeights | None = None
        self._plan: dict[str, tuple[nn.Module, Decomposition, int]] = {}
        self._report: dict[str, Any] = {}

    def calibration_batches(self) -> int:
        return int(self.cfg.calibration_batches) if self.cfg.fisher else 0

    def prepare(self, model: nn.Module, calibration: Sequence[dict[str, torch.Tensor]],
                exclude: Sequence[str] = ()) -> None:
        """Decompose every target (Fisher-weighted with ``fisher``: from ``calibration``, or without batches
        the training run's cached Fisher) and allocate bits; ``make_layer`` then uses the plan."""
        if self.cfg.fisher and calibration:
            self._fisher = self._fisher_from(model, calibration)
        self._decompose(model, self.select_targets(model, exclude))

    def apply(self, model: nn.Module, head_modules: Sequence[str] = ()) -> Injection:
        """LoRA's injection over the decomposed targets (prepared here when a caller did not: ``petuner.load``)."""
        targets = self.select_targets(model, head_modules)
        if [n for n in self._plan] != targets or any(m is not model.get_submodule(n)
                                                     for n, (m, _, _) in self._plan.items()):
            self.prepare(model, (), head_modules)
        return super().apply(model, head_modules)

    def _fisher_from(self, model: nn.Module, calibration: Sequence[dict[str, torch.Tensor]]) -> FisherWeights:
        """The diagonal Fisher (mean squared gradient) of every candidate target weight, cached for loading."""
        names = match_targets(model, self.cfg.target_modules)
        weights = [model.get_submodule(n).weight for n in names]
        flags, was_training = [w.requires_grad for w in weights], model.training
        sums = [torch.zeros_like(w) for w in weights]
        model.eval()
        try:
            with torch.enable_grad():
                for w in weights:
                    w.requires_grad_(True)
                for batch in calibration:
                    grads = torch.autograd.grad(model(**batch).loss, weights)
                    for total, g in zip(sums, grads, strict=True):
                        total += g.square()
        finally:
            for w, flag in zip(weights, flags, strict=True):
                w.requires_grad_(flag)
            model.train(was_training)
        fisher = {n: fisher_row_col(s / len(calibration)) for n, s in zip(names, sums, strict=True)}
        with atomic_file(_fisher_path(model, names)) as tmp:
            save_tensors({f"{n}.{part}": t for n, (row, col) in fisher.items()
                          for part, t in (("row", row), ("col", col))}, tmp)
        log.info("lq_lora: diagonal Fisher from %d calibration batches", len(calibration))
        return fisher

    def _fisher_for(self, model: nn.Module) -> FisherWeights | None:
        if not self.cfg.fisher:
            return None
        if self._fisher is None:  # petuner.load: no data, the training run's Fisher from the cache
            names = match_targets(model, self.cfg.target_modules)
            path = _fisher_path(model, names)
            if not path.is_file():
                raise PetunerError(f"adapter.fisher=true: no Fisher for this base model in {path.parent} "
                                   "(it is computed from the training data when a run starts)")
            t = load_file(str(path))
            self._fisher = {n: (t[f"{n}.row"], t[f"{n}.col"]) for n in names}
        return self._fisher

    def _decompose(self, model: nn.Module, targets: list[str]) -> None:
        c = self.cfg
        fisher = self._fisher_for(model)
        configs = list(BITS) if c.budget_bits is not None else [c.bits]
        modules = [model.get_submodule(n) for n in targets]
        progress = tqdm(zip(targets, modules, strict=True), total=len(targets), desc="lq_lora: decompose",
                        unit="matrix", disable=None)
        decs = [[cached_decomposition(m.weight if self.device is None else m.weight.to(self.device), c.r, b,
                                      c.block_size, c.iterations, fisher[n] if fisher else None) for b in configs]
                for n, m in progress]
        sizes = [m.weight.numel() for m in modules]
        if c.budget_bits is not None:
            bits = [[n * bits_per_param(b, c.block_size) for b in configs] for n in sizes]
            picks = allocate([[d.error for d in row] for row in decs], bits, c.budget_bits * sum(sizes))
        else:
            picks = [0] * len(targets)
        self._plan = {n: (m, row[i], configs[i]) for n, m, row, i in zip(targets, modules, decs, picks, strict=True)}
        self._report = self._summary(sizes)
        log.info("lq_lora: %s; %.3f bits/param quantized + %.3f low-rank = %.3f; quantized weights hold %s bytes",
                 ", ".join(f"{k}-bit ×{v}" for k, v in sorted(Counter(b for _, _, b in self._plan.values()).items())),
                 self._report["quantized_bits_per_param"], self._report["low_rank_bits_per_param"],
                 self._report["bits_per_param"], f"{self._report['quantized_bytes']:,}")

    def _summary(self, sizes: list[int]) -> dict[str, Any]:
        total = sum(sizes)
        per_matrix = {n: {"bits": b, "block_size": self.cfg.block_size, "error": d.error,
                          "relative_error": math.sqrt(d.error / weighted_error(m.weight.detach(), None, None))
                          if not self.cfg.fisher else None, "iterations_run": len(d.errors), "best_iterate": d.best}
                      for n, (m, d, b) in self._plan.items()}
        quantized = sum(n * bits_per_param(b, self.cfg.block_size)
                        for n, (_, _, b) in zip(sizes, self._plan.values(), strict=True)) / total
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
                    "twice. Rebuild the quantized model with `petuner.load(<run folder>)` (the decomposition is "
                    "deterministic and cached), or use the merged export.")
        return ("The base was LQ-LoRA-quantized during training: this model holds the dequantized base Q "
                "with the adapter merged, in full precision.")
