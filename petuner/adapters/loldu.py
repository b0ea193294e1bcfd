"""LoLDU (Shi et al., 2024): an LDU decomposition of W of which only a diagonal trains.

W = P L D U (torch.linalg.lu with partial pivoting, fp32; D = diag of the LU's upper factor, U made
unit-diagonal). The first r columns of P L and rows of U stay frozen; the update is
σ · (P L_r) diag(z) U_r with z (r, initialised to D_r) trained and σ = alpha/r: r parameters per
layer, the paper's form. ``train_scale: true`` also trains σ (initialised to alpha/r), as the authors'
code does (github.com/SKDDJ/LoLDU, ``minloldu/loldu.py``): r + 1 parameters, though σ·z is
over-parameterised (σ only rescales z). The frozen residual is W − σ₀ P L_r diag(D_r) U_r;
``FrozenFactorsLinear`` computes the same function as W + P L_r diag(σ z − σ₀ D_r) U_r, leaving W
untouched. The change is a rank-r LoRA (A = U_r, B = P L_r diag(σ z − σ₀ D_r), scaling 1): it merges,
and exports to peft as that LoRA.

A zero (or vanishing) pivot among the first r — a weight whose leading column is zero, or whose leading
columns are dependent — would make U_r inf/NaN. Then the columns are first ordered by a pivoted QR
(``scipy.linalg.qr(pivoting=True)``), which puts r independent columns first: W Π = P L D U, so
A = U_r Πᵀ. A weight of rank below r has no such LDU part, and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from petuner.adapters.base import AdapterSchema
from petuner.adapters.frozen_factors import FrozenFactorsLinear, FrozenFactorsMethod, FrozenFactorsSchema
from petuner.adapters.registry import register_adapter
from petuner.errors import PetunerError
from petuner.schema import flag, number


def ldu(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L, D, U) with W = P L diag(D) U, L unit lower and U unit upper triangular (D must have no zero)."""
    p, lower, upper = torch.linalg.lu(weight)
    d = torch.diagonal(upper)
    return p @ lower, d, upper / d[:, None]


def _zero_pivots(d: torch.Tensor, weight: torch.Tensor) -> bool:
    tol = torch.finfo(torch.float32).eps * max(weight.shape) * float(weight.abs().max())
    return bool((d.abs() <= tol).any())


@torch.no_grad()
def leading_ldu(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L_r, D_r, U_r Πᵀ) in fp32, each owning contiguous storage: W's top-r LDU part, with columns
    reordered by a pivoted QR (Π) only where plain partial pivoting meets a zero pivot among the first r."""
    w = weight.detach().float()
    p, lower, upper = torch.linalg.lu(w)
    d = torch.diagonal(upper)[:r]
    order = None
    if _zero_pivots(d, w):
        from scipy.linalg import qr

        order = torch.from_numpy(qr(w.cpu().double().numpy(), mode="r", pivoting=True)[1]).long().to(w.device)
        p, lower, upper = torch.linalg.lu(w[:, order])
        d = torch.diagonal(upper)[:r]
        if _zero_pivots(d, w):
            raise PetunerError(f"adapter=loldu: a {w.shape[0]}×{w.shape[1]} target weight has rank below "
                               f"adapter.r={r}, so it has no rank-r LDU part; lower r or leave that layer out")
    factor_a = upper[:r] / d[:, None]
    if order is not None:
        factor_a = torch.empty_like(factor_a).index_copy_(1, order, factor_a)  # U_r Πᵀ
    return (p @ lower[:, :r]).contiguous(), d.clone(), factor_a.contiguous()


class LoLDULinear(FrozenFactorsLinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, train_scale: bool = False) -> None:
        pl, d, upper = leading_ldu(base_layer.weight, r)
        scale = alpha / r
        super().__init__(base_layer, factor_B=pl, factor_A=upper, initial_diag=scale * d)
        dtype = base_layer.weight.dtype
        self.loldu_z = nn.Parameter(d.to(dtype).clone())  # its own storage, not a view into the LU
        self.fixed_scale = scale
        if train_scale:
            self.loldu_scale = nn.Parameter(torch.tensor(scale, dtype=dtype, device=d.device))

    def diagonal(self) -> torch.Tensor:
        scale = getattr(self, "loldu_scale", None)
        return (self.fixed_scale if scale is None else scale) * self.loldu_z


@dataclass
class LoLDUSchema(FrozenFactorsSchema):
    name: str = "loldu"
    alpha: float = number(8.0)  # σ = alpha/r (its start, with train_scale)
    train_scale: bool = flag(False)  # also train σ (over-parameterised σ·z; the paper trains z only)


@register_adapter
class LoLDU(FrozenFactorsMethod):
    """``adapter=loldu``: options ``r``, ``alpha`` (σ = alpha/r), ``train_scale`` and ``target_modules``."""

    name = "loldu"
    schema: ClassVar[type[AdapterSchema]] = LoLDUSchema

    def make_layer(self, base_layer: nn.Linear) -> LoLDULinear:
        c = self.cfg
        return LoLDULinear(base_layer, r=c.r, alpha=c.alpha, train_scale=c.train_scale)
