"""Compiled heat updates: the expression of `mpi_jobs.stencil`, one pass over memory per step.

A numpy version of the update makes ~8 passes over the grid (one per ufunc); this one reads
each cell once and writes it once, which is what lets one rank run near the memory-bandwidth
limit. LLVM vectorises the inner loop across neighbouring cells, which does not change any
cell's operation order; fast-math is off, so nothing is reassociated or fused into FMAs and the
results equal the numpy reference bit for bit (the tests check it).

Each function updates a box ``[lo0, hi0) x [lo1, hi1) [x [lo2, hi2)]`` of a padded array, so
the caller can update the interior while the halo exchange is in flight and the boundary
shell after it. The ``*_diag`` variants also return this box's fixed-point total-heat sums
``(H, L, bad)`` (see `mpi_jobs.stencil`), fused into the same loop.

Compile options (no fast-math, on-disk cache shared safely by concurrent ranks) are in
`mpi_jobs.jit`.
"""

from __future__ import annotations

import numpy as np

from mpi_jobs.jit import jit

_TWO32 = 4294967296.0
_LIMIT = 4.611686018427388e18  # 2**62


@jit
def step2d(u, new, alpha, lo0, hi0, lo1, hi1):  # type: ignore[no-untyped-def]
    for i in range(lo0, hi0):
        for j in range(lo1, hi1):
            c = u[i, j]
            new[i, j] = c + alpha * ((((u[i - 1, j] + u[i + 1, j]) + u[i, j - 1]) + u[i, j + 1])
                                     - 4.0 * c)


@jit
def step2d_diag(u, new, alpha, lo0, hi0, lo1, hi1, scale):  # type: ignore[no-untyped-def]
    high = np.int64(0)
    low = np.int64(0)
    bad = np.int64(0)
    for i in range(lo0, hi0):
        for j in range(lo1, hi1):
            c = u[i, j]
            v = c + alpha * ((((u[i - 1, j] + u[i + 1, j]) + u[i, j - 1]) + u[i, j + 1])
                             - 4.0 * c)
            new[i, j] = v
            y = v * scale
            bad |= np.int64(not (abs(y) < _LIMIT))
            h = np.floor(y)
            high += np.int64(h)
            low += np.int64(np.floor((y - h) * _TWO32))
    return high, low, bad


@jit
def step3d(u, new, alpha, lo0, hi0, lo1, hi1, lo2, hi2):  # type: ignore[no-untyped-def]
    for i in range(lo0, hi0):
        for j in range(lo1, hi1):
            for k in range(lo2, hi2):
                c = u[i, j, k]
                new[i, j, k] = c + alpha * (
                    (((((u[i - 1, j, k] + u[i + 1, j, k]) + u[i, j - 1, k]) + u[i, j + 1, k])
                      + u[i, j, k - 1]) + u[i, j, k + 1])
                    - 6.0 * c
                )


@jit
def step3d_diag(u, new, alpha, lo0, hi0, lo1, hi1, lo2, hi2, scale):  # type: ignore[no-untyped-def]
    high = np.int64(0)
    low = np.int64(0)
    bad = np.int64(0)
    for i in range(lo0, hi0):
        for j in range(lo1, hi1):
            for k in range(lo2, hi2):
                c = u[i, j, k]
                v = c + alpha * (
                    (((((u[i - 1, j, k] + u[i + 1, j, k]) + u[i, j - 1, k]) + u[i, j + 1, k])
                      + u[i, j, k - 1]) + u[i, j, k + 1])
                    - 6.0 * c
                )
                new[i, j, k] = v
                y = v * scale
                bad |= np.int64(not (abs(y) < _LIMIT))
                h = np.floor(y)
                high += np.int64(h)
                low += np.int64(np.floor((y - h) * _TWO32))
    return high, low, bad


@jit
def _boxes2d(u, new, alpha, boxes, diag, scale):  # type: ignore[no-untyped-def]
    high = np.int64(0)
    low = np.int64(0)
    bad = np.int64(0)
    for b in range(boxes.shape[0]):
        lo0, hi0, lo1, hi1 = boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3]
        if diag:
            h, lo, bd = step2d_diag(u, new, alpha, lo0, hi0, lo1, hi1, scale)
            high += h
            low += lo
            bad |= bd
        else:
            step2d(u, new, alpha, lo0, hi0, lo1, hi1)
    return high, low, bad


@jit
def _boxes3d(u, new, alpha, boxes, diag, scale):  # type: ignore[no-untyped-def]
    high = np.int64(0)
    low = np.int64(0)
    bad = np.int64(0)
    for b in range(boxes.shape[0]):
        lo0, hi0, lo1, hi1 = boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3]
        lo2, hi2 = boxes[b, 4], boxes[b, 5]
        if diag:
            h, lo, bd = step3d_diag(u, new, alpha, lo0, hi0, lo1, hi1, lo2, hi2, scale)
            high += h
            low += lo
            bad |= bd
        else:
            step3d(u, new, alpha, lo0, hi0, lo1, hi1, lo2, hi2)
    return high, low, bad


def box_array(boxes: list[tuple[tuple[int, int], ...]], ndim: int) -> np.ndarray:
    """Boxes as an ``(m, 2*ndim)`` int64 array of ``lo0, hi0, lo1, hi1[, lo2, hi2]`` rows."""
    flat = [[b for pair in box for b in pair] for box in boxes]
    return np.array(flat, dtype=np.int64).reshape(len(boxes), 2 * ndim)


def update_boxes(
    u: np.ndarray,
    new: np.ndarray,
    alpha: float,
    boxes: np.ndarray,
    scale: float | None,
) -> tuple[int, int, int]:
    """Update every box of `boxes` (see `box_array`) of the padded `u` into `new`, in one
    compiled call; the boxes' summed ``(H, L, bad)`` when `scale` is given, else zeros."""
    kernel = _boxes2d if u.ndim == 2 else _boxes3d
    diag = scale is not None
    return kernel(u, new, alpha, boxes, diag, scale if diag else 1.0)  # type: ignore[no-any-return]


def update_box(
    u: np.ndarray,
    new: np.ndarray,
    alpha: float,
    box: tuple[tuple[int, int], ...],
    scale: float | None,
) -> tuple[int, int, int]:
    """`update_boxes` for a single box given as ``((lo0, hi0), (lo1, hi1)[, (lo2, hi2)])``."""
    return update_boxes(u, new, alpha, box_array([box], u.ndim), scale)
