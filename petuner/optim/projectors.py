"""GaLore's gradient projectors: which rank-r subspace of a gradient G (m × n) the optimizer state lives in.

The side follows GaLore: for m ≥ n the projector P is r × n (right singular directions) and the
projected gradient is R = G Pᵀ (m × r); for m < n, P is m × r (left directions) and R = Pᵀ G (r × n).
Either way the state is the smaller one, and ``project_back`` maps an update back to m × n.
Projectors and the DCT basis are fp32 whatever the weight's dtype: they meet the fp32 gradient and
Adam update (a bf16 weight's gradient is upcast first), and a bf16 basis would be off by ~0.4%.

Three ways to choose P (``optimizer.projector``):
- ``svd``: the exact top-r singular vectors (``torch.linalg.svd``), as in the paper.
- ``randomized``: ``torch.svd_lowrank`` (Halko et al.), seeded per (parameter, step) in a forked RNG so
  that training's random stream is untouched and resume stays exact.
- ``dct``: SVD-free (Modoranu et al., 2025): the r columns of a fixed orthonormal DCT-II basis most
  aligned with G (one matmul and a sort); only their indices are stored. The basis comes from
  ``scipy.fft.dct``; no library offers the column selection, hence the few lines below.
"""

from __future__ import annotations

from typing import Literal

import torch

PROJECTORS = ("svd", "randomized", "dct")
Side = Literal["right", "left"]
OVERSAMPLE = 8  # extra columns for the randomized range finder (Halko et al. suggest 5-10)
POWER_ITERATIONS = 2


def side(shape: torch.Size | tuple[int, ...]) -> Side:
    """GaLore projects the longer dimension away: right directions when m ≥ n, left otherwise."""
    return "right" if shape[0] >= shape[1] else "left"


def project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    return grad @ proj.t() if side(grad.shape) == "right" else proj.t() @ grad


def project_back(low_rank: torch.Tensor, proj: torch.Tensor, full_shape: torch.Size) -> torch.Tensor:
    return low_rank @ proj if side(full_shape) == "right" else proj @ low_rank


def svd_projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The exact top-``rank`` singular directions of ``grad`` on its projected side."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    proj = vh[:rank] if side(grad.shape) == "right" else u[:, :rank]
    return proj.clone(memory_format=torch.contiguous_format)  # a slice would keep the whole SVD alive


def randomized_projector(grad: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """Top-``rank`` directions from a randomized SVD; ``seed`` makes it reproducible."""
    q = min(rank + OVERSAMPLE, *grad.shape)
    devices = list(range(torch.cuda.device_count())) if grad.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(grad.float(), q=q, niter=POWER_ITERATIONS)
    proj = v[:, :rank].t() if side(grad.shape) == "right" else u[:, :rank]
    return proj.clone(memory_format=torch.contiguous_format)


def dct_basis(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The orthonormal DCT-II basis of size n; column j is the j-th cosine."""
    import numpy as np
    from scipy.fft import dct

    matrix = dct(np.eye(n), type=2, norm="ortho", axis=0).T  # columns: basis vectors
    return torch.from_numpy(np.ascontiguousarray(matrix)).to(device=device, dtype=dtype)


def dct_indices(grad: torch.Tensor, basis: torch.Tensor, rank: int) -> torch.Tensor:
    """Indices of the ``rank`` basis columns carrying most of ``grad``'s energy, strongest first."""
    coefficients = grad @ basis if side(grad.shape) == "right" else basis.t() @ grad
    scores = coefficients.norm(dim=0 if side(grad.shape) == "right" else 1)
    return torch.argsort(scores, descending=True, stable=True)[:rank]


def dct_projector(basis: torch.Tensor, indices: torch.Tensor, full_shape: torch.Size) -> torch.Tensor:
    """P from stored indices, in the same orientation as the SVD projectors."""
    columns = basis[:, indices]
    return columns.t() if side(full_shape) == "right" else columns
