"""LQ-LoRA's decomposition (Guo et al., ICLR 2024): W ≈ Q + L1·L2, Q quantized, L1·L2 of rank r.

Alternate: L1·L2 = rank-r SVD of W − Q, then Q = quantize(W − L1·L2); stop when the error stops
falling and keep the BEST iterate (the reference code keeps the last one). With a diagonal Fisher F
(one value per weight), the error is the full-diagonal weighted one, ‖√F ⊙ (W − Q − L1 L2)‖²_F: it is
what the stopping rule and the bit allocation compare. Only the SVD uses the paper's row/column
reduction of F (a weighted SVD has no closed form for an arbitrary diagonal): rows weighted by
sqrt(mean_j F_ij), columns by sqrt(mean_i F_ij), the SVD taken of D_r R D_c and unweighted afterwards.
The SVD is ``torch.svd_lowrank`` under a fixed seed, so a decomposition is reproducible (and cacheable).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from petuner.quant.nf import ABSMAX_GROUP, NFQuantized, round_nf

SVD_OVERSAMPLE = 8
SVD_POWER_ITERATIONS = 4


@dataclass
class Decomposition:
    q: NFQuantized
    L1: torch.Tensor  # out × r
    L2: torch.Tensor  # r × in
    errors: list[float]  # the (Fisher-weighted) squared error of every iterate computed
    best: int  # index of the kept iterate

    @property
    def error(self) -> float:
        return self.errors[self.best]


def weighted_error(residual: torch.Tensor, fisher: torch.Tensor | None = None) -> float:
    """‖√F ⊙ R‖²_F = Σ F R² (the plain squared Frobenius norm without a Fisher)."""
    squared = residual.double().square()
    return float((squared * fisher.double()).sum() if fisher is not None else squared.sum())


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draws on ``device`` from ``seed``, leaving every generator as it was. (``torch.manual_seed``
    would also reseed every CUDA generator, which ``fork_rng`` only restores for the devices it is given:
    the run's dropout would then ignore ``trainer.seed``.)"""
    index = (device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None
    with torch.random.fork_rng(devices=[] if index is None else [index], device_type="cuda"):
        generator = torch.random.default_generator if index is None else torch.cuda.default_generators[index]
        generator.manual_seed(seed)
        yield


def low_rank(residual: torch.Tensor, rank: int, row: torch.Tensor | None = None, col: torch.Tensor | None = None,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 (m×r), L2 (r×n) with L1 L2 the best rank-r approximation of R (in the weighted norm); √S in both."""
    weighted = residual if row is None or col is None else residual * row[:, None] * col[None, :]
    q = min(rank + SVD_OVERSAMPLE, *weighted.shape)
    with seeded(seed, weighted.device):
        u, s, v = torch.svd_lowrank(weighted, q=q, niter=SVD_POWER_ITERATIONS)
    root = s[:rank].sqrt()
    l1, l2 = u[:, :rank] * root, (v[:, :rank] * root).T
    if row is not None and col is not None:
        l1, l2 = l1 / row[:, None], l2 / col[None, :]
    return l1.contiguous(), l2.contiguous()


def lq_decompose(weight: torch.Tensor, rank: int, bits: int, block_size: int, iterations: int,
                 fisher: torch.Tensor | None = None, group_size: int = ABSMAX_GROUP) -> Decomposition:
    """The iterative low-rank + quantized decomposition of one matrix; returns the best iterate.

    ``fisher``: the diagonal Fisher of ``weight`` (same shape), or None for the unweighted problem.
    """
    w = weight.detach().float()
    row, col = fisher_weights(fisher) if fisher is not None else (None, None)
    q_dense = torch.zeros_like(w)
    errors: list[float] = []
    best = None
    for step in range(iterations):
        l1, l2 = low_rank(w - q_dense, rank, row, col)
        low = l1 @ l2
        rounded = round_nf(w - low, bits, block_size, group_size)
        q_dense = rounded.dense
        errors.append(weighted_error(w - q_dense - low, fisher))
        if best is None or errors[-1] < errors[best[0]]:
            best = (step, rounded, l1, l2)
        elif errors[-1] >= errors[-2]:
            break
    assert best is not None
    step, rounded, l1, l2 = best
    return Decomposition(q=rounded.packed(), L1=l1, L2=l2, errors=errors, best=step)


def fisher_weights(fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column weights sqrt(mean_j F), sqrt(mean_i F) for the weighted SVD, floored so none is zero."""
    fisher = fisher.float()
    row, col = fisher.mean(1).sqrt(), fisher.mean(0).sqrt()
    floor = 1e-6 * max(float(row.mean()), float(col.mean()), 1e-30)
    return row.clamp_min(floor), col.clamp_min(floor)
