"""Any trained adapter as one plain LoRA: ``petuner export --as-lora [--rank R | --energy E]``.

Each adapter layer's exact update ΔW (relative to the original base weight: ``AdapterLayer.weight_update``)
becomes LoRA factors by truncated SVD, one matrix at a time on the device the layer lives on. A layer whose
update is already a LoRA (its ``lora_view``, no variant tensors) is decomposed from its factors (two thin
QRs and an r×r SVD, never the dense matrix), and kept as it is when the requested rank holds it: for
LoRA-shaped methods the conversion is exact and changes nothing.

The result is the plainest LoRA there is, for tools that read only ``r`` and ``lora_alpha``
(llama.cpp's converter ignores ``use_rslora`` and rank/alpha patterns, vLLM the patterns): one rank for
every layer (smaller layers padded with zero rows, which change nothing), one scale, no rsLoRA, no DoRA.
Each layer's own scale is folded into its B. The relative error ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F is read off the
singular values, per matrix and over all of them.

peft has no such conversion (its ``add_weighted_adapter(combination_type="svd")`` handles only LoRA
inputs), hence this module.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petuner.adapters.base import AdapterLayer, LoRAFactors, adapter_layers
from petuner.errors import PetunerError


@dataclass
class Conversion:
    """Plain LoRA factors (one rank, one scaling for every layer) and what the truncation lost."""

    factors: dict[str, LoRAFactors]
    report: dict[str, Any]


def check_request(rank: int | None, energy: float | None) -> None:
    """``--rank`` and ``--energy`` exclude each other and must be in range (checked before any loading)."""
    if rank is not None and energy is not None:
        raise PetunerError("--rank and --energy both given: give one (a fixed rank, or the share of the "
                           "squared singular values to keep)")
    if rank is not None and rank < 1:
        raise PetunerError(f"--rank {rank}: must be >= 1")
    if energy is not None and not 0 < energy <= 1:
        raise PetunerError(f"--energy {energy}: must be in (0, 1], e.g. 0.99")


def check_lora_form(method: Any, rank: int | None, energy: float | None) -> None:
    """Before loading: a method whose update is no LoRA (no peft LoRA form, or DoRA's) needs a truncation."""
    options = method.peft_options()
    if rank is None and energy is None and (options is None or options.get("use_dora")):
        raise PetunerError(f"adapter={method.name}: its update is no LoRA; give --rank R or --energy E (e.g. 0.99) "
                           "to convert it by truncated SVD")


def factor_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD U, S, Vh of ``b @ a`` (out × r times r × in) from thin QRs of the factors: O((out+in)·r²)."""
    qb, rb = torch.linalg.qr(b.float())
    qa, ra = torch.linalg.qr(a.float().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def kept_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """How many singular values to keep: ``rank`` of them, or the fewest holding ``energy`` of Σ s²."""
    nonzero = int((s > 0).sum())
    if energy is None:
        return min(rank or nonzero, nonzero)
    share = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    return min(int((share < energy - 1e-12).sum()) + 1, nonzero)


def convert_layer(layer: AdapterLayer, rank: int | None, energy: float | None) -> tuple[LoRAFactors, float, float]:
    """One layer as LoRA factors of rank ≤ ``rank``, with the squared error and squared norm of its ΔW."""
    view = layer.lora_view()
    if view is not None and not view.extra:
        if energy is None and (rank is None or rank >= view.A.shape[0]):  # already a LoRA that fits: as it is
            norm = float((view.scaling * view.B.float() @ view.A.float()).norm() ** 2)
            return LoRAFactors(A=view.A.detach(), B=view.B.detach(), scaling=view.scaling), 0.0, norm
        u, s, vh = factor_svd(view.B.detach(), view.A.detach())
        s = s * abs(view.scaling)
        u = u * math.copysign(1.0, view.scaling)
    else:
        if rank is None and energy is None:
            raise PetunerError(f"{type(layer).__name__}'s update is no LoRA: give --rank R or --energy E "
                               "to convert it by truncated SVD")
        u, s, vh = torch.linalg.svd(layer.weight_update().detach().float(), full_matrices=False)
    k = kept_rank(s, rank, energy)
    root = s[:k].sqrt()
    factors = LoRAFactors(A=(root[:, None] * vh[:k]).contiguous(), B=(u[:, :k] * root).contiguous(), scaling=1.0)
    return factors, float((s[k:].double() ** 2).sum()), float((s.double() ** 2).sum())


def plain_form(factors: dict[str, LoRAFactors]) -> dict[str, LoRAFactors]:
    """One rank (the largest, others zero-padded) and one scaling (the most common, others folded into B)."""
    r = max(f.A.shape[0] for f in factors.values())
    scaling = Counter(f.scaling for f in factors.values()).most_common(1)[0][0]
    plain = {}
    for name, f in factors.items():
        pad = r - f.A.shape[0]
        b = f.B if f.scaling == scaling else f.B * (f.scaling / scaling)
        plain[name] = LoRAFactors(A=nn.functional.pad(f.A, (0, 0, 0, pad)), B=nn.functional.pad(b, (0, pad)),
                                  scaling=scaling)
    return plain


@torch.no_grad()
def to_lora(model: nn.Module, rank: int | None = None, energy: float | None = None) -> Conversion:
    """Every adapter layer of ``model`` as one plain LoRA; layers whose update is zero drop out."""
    check_request(rank, energy)
    kept: dict[str, LoRAFactors] = {}
    matrices: dict[str, dict[str, float]] = {}
    lost = total = 0.0
    for name, layer in adapter_layers(model):
        factors, err, norm = convert_layer(layer, rank, energy)
        lost, total = lost + err, total + norm
        matrices[name] = {"rank": factors.A.shape[0], "relative_error": math.sqrt(err / norm) if norm else 0.0}
        if factors.A.shape[0] > 0 and norm > 0:
            kept[name] = factors
    if not kept:
        raise PetunerError("every adapter layer's update is zero: nothing to export as LoRA")
    plain = plain_form(kept)
    r = next(iter(plain.values())).A.shape[0]
    errors = [m["relative_error"] for m in matrices.values()]
    report = {"rank": r, "lora_alpha": next(iter(plain.values())).scaling * r,
              "requested": {"rank": rank, "energy": energy},
              "overall_relative_error": math.sqrt(lost / total) if total else 0.0,
              "max_relative_error": max(errors), "matrices": matrices}
    return Conversion(factors=plain, report=report)
