"""The Pareto front of any number of objectives, each minimised or maximised, with ties.

It is behind the collector's `pareto` column (per sweep, of that sweep's objectives), which table.md's
star, the terminal summary and the frontier figure all read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Objective values within this relative distance of each other count as equal (the 4 significant digits
# the tables show): trials that look identical are treated alike, on the front together or off it.
TIE_RTOL = 1e-4


def pareto_mask(values: Any, directions: Sequence[str] | None = None) -> np.ndarray:
    """True for the points no other point dominates, for any number of objectives.

    `values` is [n points, k objectives] (e.g. `np.column_stack([l0, fvu])`); `directions` holds
    "minimize" or "maximize" per objective (default: all minimised). A point dominates another when it
    is at least as good on every objective and better on one, where values within TIE_RTOL are ties,
    so identical-looking points are all on the front or none is. Points with a NaN are never on it and
    never dominate.
    """
    v = np.asarray(values, dtype=float).reshape(len(values), -1)
    n, k = v.shape
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in (directions or ["minimize"] * k)])
    lower = v * signs  # every objective now minimised
    mask = np.zeros(n, dtype=bool)
    valid = np.flatnonzero(np.isfinite(lower).all(axis=1))
    if len(valid) == 0:
        return mask
    p = lower[valid]
    tol = TIE_RTOL * np.maximum(np.abs(p[:, None, :]), np.abs(p[None, :, :]))
    better_eq = p[:, None, :] <= p[None, :, :] + tol  # [i, j, k]: i at least as good as j on k
    strictly = p[:, None, :] < p[None, :, :] - tol
    dominates = better_eq.all(axis=2) & strictly.any(axis=2)  # [i, j]: i dominates j
    mask[valid] = ~dominates.any(axis=0)
    return mask
