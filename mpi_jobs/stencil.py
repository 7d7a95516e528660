"""The heat kernel's numerics in plain numpy: the serial reference and the total-heat sum.

Everything here is what the MPI kernel must reproduce *bit for bit*, for any rank count. The
update of a cell is the fixed expression

    u + alpha * ((((u[a0-] + u[a0+]) + u[a1-]) + u[a1+]) [+ u[a2-]) + u[a2+]] - 2d * u)

(neighbours along axis 0 first, minus side before plus side; ``2d`` = 4.0 in 2D, 6.0 in 3D),
evaluated with correctly rounded IEEE operations and never reassociated. A cell's new value
therefore depends only on its neighbours' values, not on which rank owns it or in which order
cells are visited; halo values are exact copies. The compiled kernels in `stencil_numba` use the
same expression, with no fast-math, and the tests compare them with ``np.array_equal``.

Axes are ``(ny, nx)`` in 2D and ``(nz, ny, nx)`` in 3D; each axis has its own boundary:
``dirichlet`` (the value outside the domain is 0) or ``periodic``.

Total heat, independent of the rank count
-----------------------------------------
A float sum depends on the order of additions, so per-rank partial sums combined by
``MPI_Allreduce`` would change in the last bits with the decomposition. Instead every cell value
``x`` is cut, exactly, into two integers at a scale ``2**S`` that is the same for every rank:

    y = x * 2**S            (exact: scaling by a power of two)
    h = floor(y)            (exact)
    l = floor((y - h) * 2**32)   (y - h is exact, in [0, 1); the scaling is exact)

and the integers are summed. Integer addition is associative, so the per-rank sums, reduced in
any order by MPI, give the same ``(H, L)`` for any decomposition; the total is
``(H * 2**32 + L) / 2**(S + 32)``, rounded once, correctly, to a double. What is dropped per
cell (below ``2**-(S + 32)``) depends only on that cell's value, never on the rank count.

``S`` is chosen from the global cell count and the largest ``|u0|`` so the integer sums cannot
overflow int64 at any step: the explicit scheme with ``alpha <= 1/(2d)`` is a convex
combination of neighbours, so ``max |u|`` never grows (the maximum principle); a factor-two
margin covers rounding. For a 10^8-cell field of values up to 100 this keeps ~60 bits below
the largest value: the result agrees with ``math.fsum`` of the field to the last bit or so, and
it is identical for any rank count by construction. It costs a few integer operations per cell
fused into the update (no extra pass over memory) and no per-step communication: the per-step
``(H, L)`` pairs are reduced in one ``MPI_Reduce`` at the end (or at each checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOUNDARIES = ("dirichlet", "periodic")
AXIS_NAMES_2D = ("y", "x")
AXIS_NAMES_3D = ("z", "y", "x")
_LIMB = 32
_MASK32 = (1 << _LIMB) - 1


def max_alpha(ndim: int) -> float:
    """Von Neumann stability limit of the explicit scheme in `ndim` dimensions."""
    return 1.0 / (2 * ndim)


def check_alpha(alpha: float, ndim: int) -> None:
    limit = max_alpha(ndim)
    if not 0.0 < alpha <= limit:
        raise ValueError(
            f"alpha must be in (0, {limit:g}] for the explicit {ndim}D scheme to be stable, "
            f"got {alpha}"
        )


def _normalise_bc(bc: Sequence[str] | None, ndim: int) -> tuple[str, ...]:
    if bc is None:
        return ("dirichlet",) * ndim
    bc = tuple(bc)
    if len(bc) != ndim or any(b not in BOUNDARIES for b in bc):
        raise ValueError(f"bc must be {ndim} values from {BOUNDARIES}, got {bc}")
    return bc


def fill_periodic_ghosts(u: np.ndarray, bc: Sequence[str]) -> None:
    """Copy opposite faces into the ghost layers of periodic axes of the padded array `u`."""
    for axis, kind in enumerate(bc):
        if kind != "periodic":
            continue
        n = u.shape[axis] - 2
        src_lo = [slice(None)] * u.ndim
        dst_lo = [slice(None)] * u.ndim
        src_hi = [slice(None)] * u.ndim
        dst_hi = [slice(None)] * u.ndim
        src_lo[axis], dst_hi[axis] = slice(1, 2), slice(n + 1, n + 2)
        src_hi[axis], dst_lo[axis] = slice(n, n + 1), slice(0, 1)
        u[tuple(dst_hi)] = u[tuple(src_lo)]
        u[tuple(dst_lo)] = u[tuple(src_hi)]


def stencil_step(u: np.ndarray, new: np.ndarray, alpha: float, scratch: np.ndarray) -> None:
    """Write one explicit step of the padded array `u` into the interior of `new`.

    A fixed sequence of element-wise ufuncs (see the module docstring for the expression);
    element-wise IEEE operations are correctly rounded and never reassociated. The ``out=``
    form avoids per-step temporaries. The ghost layer of `new` is left alone; `scratch` has
    the interior's shape.
    """
    ndim = u.ndim
    inner = tuple(slice(1, -1) for _ in range(ndim))

    def shifted(axis: int, offset: int) -> np.ndarray:
        index = list(inner)
        index[axis] = slice(1 + offset, u.shape[axis] - 1 + offset)
        return u[tuple(index)]

    acc = new[inner]
    centre = u[inner]
    np.add(shifted(0, -1), shifted(0, 1), out=acc)
    for axis in range(1, ndim):
        np.add(acc, shifted(axis, -1), out=acc)
        np.add(acc, shifted(axis, 1), out=acc)
    np.multiply(centre, float(2 * ndim), out=scratch)
    np.subtract(acc, scratch, out=acc)
    np.multiply(acc, alpha, out=acc)
    np.add(centre, acc, out=acc)


def _reference_run(
    u0: np.ndarray,
    steps: int,
    alpha: float,
    bc: Sequence[str] | None,
    diag_every: int,
) -> tuple[np.ndarray, list[int], list[float]]:
    u0 = np.asarray(u0, dtype=np.float64)
    if u0.ndim not in (2, 3):
        raise ValueError(f"u0 must be 2D (ny, nx) or 3D (nz, ny, nx), got shape {u0.shape}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    check_alpha(alpha, u0.ndim)
    bc = _normalise_bc(bc, u0.ndim)
    scale = total_heat_scale(u0.size, float(np.max(np.abs(u0))) if u0.size else 0.0)
    u = np.zeros(tuple(n + 2 for n in u0.shape))
    inner = tuple(slice(1, -1) for _ in range(u0.ndim))
    u[inner] = u0
    new = np.zeros_like(u)
    scratch = np.empty(u0.shape)
    diag_steps, diag_values = [], []
    if diag_every:
        diag_steps.append(0)
        diag_values.append(total_heat(u0, scale))
    for step in range(1, steps + 1):
        fill_periodic_ghosts(u, bc)
        stencil_step(u, new, alpha, scratch)
        u, new = new, u
        if diag_every and step % diag_every == 0:
            diag_steps.append(step)
            diag_values.append(total_heat(u[inner], scale))
    return u[inner].copy(), diag_steps, diag_values


def reference_solution(
    u0: np.ndarray, steps: int, alpha: float, bc: Sequence[str] | None = None
) -> np.ndarray:
    """Serial result that the MPI kernel must match bit for bit, for any rank count.

    `bc` gives each axis's boundary (``dirichlet`` or ``periodic``); all Dirichlet by default.
    """
    return _reference_run(u0, steps, alpha, bc, diag_every=0)[0]


def reference_total_heat(
    u0: np.ndarray,
    steps: int,
    alpha: float,
    bc: Sequence[str] | None = None,
    every: int = 1,
) -> tuple[list[int], list[float]]:
    """The total-heat series (steps 0, every, 2*every, ...) the MPI kernel must reproduce."""
    if every <= 0:
        raise ValueError(f"every must be positive, got {every}")
    _, steps_out, values = _reference_run(u0, steps, alpha, bc, diag_every=every)
    return steps_out, values


# --------------------------------------------------------------------------- total heat


def total_heat_scale(cells: int, max_abs: float) -> int:
    """The exponent S of the fixed-point total (see the module docstring).

    Chosen so that ``cells * 2 * max_abs * 2**S < 2**61``: neither the per-rank nor the
    global integer sums can overflow int64 while ``|u| <= 2 * max_abs``.
    """
    if cells <= 0:
        raise ValueError(f"cells must be positive, got {cells}")
    if not math.isfinite(max_abs) or max_abs < 0:
        raise ValueError(f"max_abs must be finite and >= 0, got {max_abs}")
    cell_bits = (cells - 1).bit_length()  # ceil(log2(cells))
    value_bits = math.frexp(2.0 * max_abs)[1] if max_abs > 0 else 0  # 2*max_abs < 2**value_bits
    return max(-1000, min(1000, 61 - cell_bits - value_bits))


def fixed_point_parts(values: np.ndarray, scale: int) -> tuple[int, int]:
    """The exact integer sums ``(H, L)`` of `values` at scale ``2**scale``, normalised so
    that ``0 <= L < 2**32``."""
    y = np.asarray(values, dtype=np.float64) * math.ldexp(1.0, scale)
    if not np.all(np.abs(y) < 2.0**62):
        raise ValueError("values out of range for the fixed-point total (NaN, inf or too large)")
    h = np.floor(y)
    low = np.floor((y - h) * float(1 << _LIMB))
    return normalise_parts(int(h.astype(np.int64).sum()), int(low.astype(np.int64).sum()))


def normalise_parts(high: int, low: int) -> tuple[int, int]:
    """Move the carries of `low` into `high`, leaving ``0 <= low < 2**32``."""
    return high + (low >> _LIMB), low & _MASK32


def parts_to_float(high: int, low: int, scale: int) -> float:
    """``(high * 2**32 + low) / 2**(scale + 32)``, correctly rounded to a double."""
    numerator = high * (1 << _LIMB) + low
    shift = scale + _LIMB
    if shift >= 0:
        return numerator / (1 << shift)  # int / int is correctly rounded in Python
    return float(numerator * (1 << -shift))


def total_heat(values: np.ndarray, scale: int) -> float:
    """Total heat of `values` by the fixed-point method (what every rank count agrees on)."""
    return parts_to_float(*fixed_point_parts(values, scale), scale)
