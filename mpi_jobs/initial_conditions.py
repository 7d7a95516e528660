"""Deterministic initial fields for the kernels, so an input is generated once and reused."""

from __future__ import annotations

import numpy as np


def heat_hotspots(ny: int, nx: int, seed: int = 0, spots: int = 4) -> np.ndarray:
    """A few Gaussian hot spots on a cold plate: smooth, non-trivial, same bytes every time."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    field = np.zeros((ny, nx), dtype=np.float64)
    for _ in range(spots):
        cy, cx = rng.uniform(0.2, 0.8) * ny, rng.uniform(0.2, 0.8) * nx
        width = max(2.0, rng.uniform(0.05, 0.12) * min(nx, ny))
        field += rng.uniform(50.0, 100.0) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / width**2)
    return field
