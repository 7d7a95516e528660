"""Compiled heat updates: the expression of `mpi_jobs.stencil`, one pass over memory per step.

A numpy version of the update makes ~8 passes over the grid (one per ufunc); this one reads
each cell once and writes it once, which is what lets one rank run near the memory-bandwidth
limit. LLVM vectorises the inner loop across neighbouring cells, which does not change any
cell's operation order; fast-math is off, so nothing is reassociated or fused into FMAs and the
results equal the numpy reference bit for bit (the tests check it).

Each function updates a box ``[lo0, hi0) x [lo1, hi1) [x [lo2, hi2)]`` of a padded array, so
the caller can update the interior while the halo exchange is in flight and the boundary
shell after it. The ``*_sum`` variants also return this box's fixed-point total-heat sums
``(H, L)`` (see `mpi_jobs.stencil`), fused into the same loop and vectorised with it (see
`_MAGIC`); a value outside their fast range (only on grids under ~2**10 cells, or a field that
broke the maximum principle) makes the box's sums be redone by the exact scalar `sum2d` /
`sum3d`, which also flags NaN/inf.

Compile options (no fast-math, on-disk cache shared safely by concurrent ranks) are in
`mpi_jobs.jit`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from mpi_jobs.jit import jit

_TWO32 = 4294967296.0
_LIMIT = 4.611686018427388e18  # 2**62
# Fast path of the fused total-heat sum: an integral double h with |h| < 2**51 converts to
# int64 exactly as ``bits(h + _MAGIC) - bits(_MAGIC)`` (h + 1.5 * 2**52 lands in the binade
# [2**52, 2**53) where the ulp is 1, so its bit pattern is linear in h). That is a vector add
# and a vector integer add on AVX2; ``np.int64(h)`` is a scalar cvttsd2si per cell (AVX2 has
# no packed double -> int64 conversion), which is what made the diagnostic cost ~25%.
_MAGIC = 6755399441055744.0  # 1.5 * 2**52
_FAST_LIMIT = 2251799813685248.0  # 2**51
_U1 = np.uint64(1)


@intrinsic
def _bits(typingctx, x):  # type: ignore[no-untyped-def]
    """The IEEE bit pattern of a float64 as an int64 (a register bitcast, no memory)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


# Loops index with uint64 on purpose: numba wraps a *signed* index that could be negative
# (``u[i, j - 1]`` -> ``j - 1 < 0 ? j - 1 + n : j - 1``), and that per-lane select stopped
# LLVM from seeing consecutive addresses: the "vectorised" loop gathered every operand with
# scalar loads and scattered the results with scalar stores (vmovsd/vmovhpd/vinsertf128 in
# the assembly), which is where the update lost its bandwidth. Unsigned indices are never
# wrapped, so the inner loop becomes plain vmovupd loads and stores. Row views (``u[i]``)
# keep the address arithmetic out of the inner loop.


@jit
def step2d(u, new, alpha, lo0, hi0, lo1, hi1):  # type: ignore[no-untyped-def]
    for i in range(np.uint64(lo0), np.uint64(hi0)):
        um, uc, up, nr = u[i - _U1], u[i], u[i + _U1], new[i]
        for j in range(np.uint64(lo1), np.uint64(hi1)):
            c = uc[j]
            nr[j] = c + alpha * ((((um[j] + up[j]) + uc[j - _U1]) + uc[j + _U1]) - 4.0 * c)


@jit
def step2d_sum(u, new, alpha, lo0, hi0, lo1, hi1, scale):  # type: ignore[no-untyped-def]
    """`step2d` plus the box's fixed-point ``(H, L)`` by the fast path; ``big`` is nonzero when
    some cell is outside the fast path's range (or NaN): then the caller redoes the sums with
    `sum2d`, which is exact for every value and flags the truly bad ones."""
    high = np.int64(0)
    low = np.int64(0)
    big = np.int64(0)
    magic = _bits(_MAGIC)
    for i in range(np.uint64(lo0), np.uint64(hi0)):
        um, uc, up, nr = u[i - _U1], u[i], u[i + _U1], new[i]
        hr = np.int64(0)
        lr = np.int64(0)
        for j in range(np.uint64(lo1), np.uint64(hi1)):
            c = uc[j]
            v = c + alpha * ((((um[j] + up[j]) + uc[j - _U1]) + uc[j + _U1]) - 4.0 * c)
            nr[j] = v
            y = v * scale
            big |= np.int64(not (abs(y) < _FAST_LIMIT))
            h = np.floor(y)
            hr += _bits(h + _MAGIC)
            lr += _bits(np.floor((y - h) * _TWO32) + _MAGIC)
        cells = np.int64(hi1 - lo1)
        high += hr - cells * magic  # int64 wraps: exact modulo 2**64, and the true sum fits
        low += lr - cells * magic
    return high, low, big


@jit
def step3d(u, new, alpha, lo0, hi0, lo1, hi1, lo2, hi2):  # type: ignore[no-untyped-def]
    for i in range(np.uint64(lo0), np.uint64(hi0)):
        for j in range(np.uint64(lo1), np.uint64(hi1)):
            zm, zp = u[i - _U1, j], u[i + _U1, j]
            ym, uc, yp, nr = u[i, j - _U1], u[i, j], u[i, j + _U1], new[i, j]
            for k in range(np.uint64(lo2), np.uint64(hi2)):
                c = uc[k]
                nr[k] = c + alpha * (
                    (((((zm[k] + zp[k]) + ym[k]) + yp[k]) + uc[k - _U1]) + uc[k + _U1])
                    - 6.0 * c
                )


@jit
def step3d_sum(u, new, alpha, lo0, hi0, lo1, hi1, lo2, hi2, scale):  # type: ignore[no-untyped-def]
    """`step3d` plus the fast-path sums (see `step2d_sum`)."""
    high = np.int64(0)
    low = np.int64(0)
    big = np.int64(0)
    magic = _bits(_MAGIC)
    for i in range(np.uint64(lo0), np.uint64(hi0)):
        for j in range(np.uint64(lo1), np.uint64(hi1)):
            zm, zp = u[i - _U1, j], u[i + _U1, j]
            ym, uc, yp, nr = u[i, j - _U1], u[i, j], u[i, j + _U1], new[i, j]
            hr = np.int64(0)
            lr = np.int64(0)
            for k in range(np.uint64(lo2), np.uint64(hi2)):
                c = uc[k]
                v = c + alpha * (
                    (((((zm[k] + zp[k]) + ym[k]) + yp[k]) + uc[k - _U1]) + uc[k + _U1])
                    - 6.0 * c
                )
                nr[k] = v
                y = v * scale
                big |= np.int64(not (abs(y) < _FAST_LIMIT))
                h = np.floor(y)
                hr += _bits(h + _MAGIC)
                lr += _bits(np.floor((y - h) * _TWO32) + _MAGIC)
            cells = np.int64(hi2 - lo2)
            high += hr - cells * magic
            low += lr - cells * magic
    return high, low, big


@jit
def _exact_sums(flat, scale):  # type: ignore[no-untyped-def]
    """Exact ``(H, L, bad)`` of a 1-D run of values, for any value (the slow, scalar path)."""
    high = np.int64(0)
    low = np.int64(0)
    bad = np.int64(0)
    for x in flat:
        y = x * scale
        if not (abs(y) < _LIMIT):
            bad = np.int64(1)
            continue
        h = np.floor(y)
        high += np.int64(h)
        low += np.int64(np.floor((y - h) * _TWO32))
    return high, low, bad


@jit
def sum2d(a, lo0, hi0, lo1, hi1, scale):  # type: ignore[no-untyped-def]
    high = np.int64(0)
    low = np.int64(0)
    bad = np.int64(0)
    for i in range(lo0, hi0):
        h, lo, b = _exact_sums(a[i, lo1:hi1], scale)
        high += h
        low += lo
        bad |= b
    return high, low, bad


@jit
def sum3d(a, lo0, hi0, lo1, hi1, lo2, hi2, scale):  # type: ignore[no-untyped-def]
    high = np.int64(0)
    low = np.int64(0)
    bad = np.int64(0)
    for i in range(lo0, hi0):
        for j in range(lo1, hi1):
            h, lo, b = _exact_sums(a[i, j, lo2:hi2], scale)
            high += h
            low += lo
            bad |= b
    return high, low, bad


@jit
def _boxes2d(u, new, alpha, boxes, diag, scale):  # type: ignore[no-untyped-def]
    high = np.int64(0)
    low = np.int64(0)
    bad = np.int64(0)
    for b in range(boxes.shape[0]):
        lo0, hi0, lo1, hi1 = boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3]
        if diag:
            h, lo, big = step2d_sum(u, new, alpha, lo0, hi0, lo1, hi1, scale)
            if big:
                h, lo, big = sum2d(new, lo0, hi0, lo1, hi1, scale)
            high += h
            low += lo
            bad |= big
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
            h, lo, big = step3d_sum(u, new, alpha, lo0, hi0, lo1, hi1, lo2, hi2, scale)
            if big:
                h, lo, big = sum3d(new, lo0, hi0, lo1, hi1, lo2, hi2, scale)
            high += h
            low += lo
            bad |= big
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
