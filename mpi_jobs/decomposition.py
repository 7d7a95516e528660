"""Balanced block partitions of a 1D index range.

Kept free of MPI so the same arithmetic can be used by the kernels (to find a rank's block), by
rank 0 (to place gathered blocks) and by tests, and so all of them agree by construction.
"""

from __future__ import annotations


def _check(n: int, parts: int) -> None:
    if n <= 0:
        raise ValueError(f"cannot partition {n} cells: the extent must be positive")
    if parts <= 0:
        raise ValueError(f"cannot split into {parts} parts: the number of parts must be positive")
    if parts > n:
        raise ValueError(
            f"cannot split {n} cells into {parts} parts: every part must own at least one cell; "
            f"use at most {n} parts or a larger extent"
        )


def block_counts(n: int, parts: int) -> list[int]:
    """Sizes of the `parts` blocks of [0, n).

    The first ``n % parts`` blocks get one extra cell, so sizes differ by at most one and the
    load is as even as a contiguous split allows.
    """
    _check(n, parts)
    base, extra = divmod(n, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def block_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """Half-open ``[start, stop)`` of block `index` in the partition of `block_counts`.

    Computed in closed form rather than by summing counts, so each rank can find its own block
    in O(1) without knowing anyone else's.
    """
    _check(n, parts)
    if not 0 <= index < parts:
        raise ValueError(f"block index {index} is out of range for {parts} parts (0..{parts - 1})")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    stop = start + base + (1 if index < extra else 0)
    return start, stop
