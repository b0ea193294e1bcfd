"""Mixed-precision allocation: one quantization config per matrix, by integer linear programming.

minimise Σ_i Σ_c e_ic x_ic  subject to  Σ_c x_ic = 1 for every matrix i,  Σ_ic b_ic x_ic ≤ budget,
x binary; e_ic is matrix i's reconstruction error under config c, b_ic the bits it takes. Solved with
``scipy.optimize.milp`` (HiGHS), as in LQ-LoRA.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from petuner.errors import ConfigError


def allocate(errors: np.ndarray, bits: np.ndarray, budget: float) -> list[int]:
    """The config index per matrix (rows of ``errors``/``bits``) minimising total error within ``budget`` bits."""
    errors, bits = np.asarray(errors, dtype=float), np.asarray(bits, dtype=float)
    n_mat, n_cfg = errors.shape
    if bits.min(1).sum() > budget:
        raise ConfigError(f"a budget of {budget:.0f} bits is below the cheapest allocation "
                          f"({bits.min(1).sum():.0f} bits)")
    one_each = np.kron(np.eye(n_mat), np.ones(n_cfg))
    scale = errors.max() or 1.0  # keep HiGHS well conditioned
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(bits.ravel()[None, :], -np.inf, budget)]
    result = milp(c=errors.ravel() / scale, integrality=np.ones(errors.size), bounds=Bounds(0, 1),
                  constraints=constraints, options={"mip_rel_gap": 0.0})
    if not result.success:
        raise ConfigError(f"the bit allocation has no solution within {budget:.0f} bits ({result.message})")
    return [int(i) for i in np.round(result.x).reshape(n_mat, n_cfg).argmax(1)]
