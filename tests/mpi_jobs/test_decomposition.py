from __future__ import annotations

from itertools import pairwise

import pytest

from mpi_jobs.decomposition import block_counts, block_range

CASES = [(n, parts) for n in range(1, 40) for parts in range(1, n + 1)] + [
    (1_000_003, 7),
    (1_000_003, 1_024),
]


def _check_tiling(n: int, parts: int) -> None:
    ranges = [block_range(n, parts, i) for i in range(parts)]
    # Contiguous, non-overlapping, starting at 0 and ending at n: together an exact tiling.
    assert ranges[0][0] == 0
    assert ranges[-1][1] == n
    for (_, stop), (start, _) in pairwise(ranges):
        assert stop == start
    sizes = [stop - start for start, stop in ranges]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    assert sizes == block_counts(n, parts)


def test_blocks_tile_the_range_exactly() -> None:
    # One test over many cases: hundreds of parametrized ids would only add noise.
    for n, parts in CASES:
        try:
            _check_tiling(n, parts)
        except AssertionError as exc:
            raise AssertionError(f"n={n}, parts={parts}: {exc}") from exc


def test_larger_blocks_come_first() -> None:
    assert block_counts(10, 4) == [3, 3, 2, 2]
    assert block_range(10, 4, 0) == (0, 3)
    assert block_range(10, 4, 2) == (6, 8)
    assert block_range(10, 4, 3) == (8, 10)


@pytest.mark.parametrize(
    ("n", "parts", "match"),
    [
        (3, 4, "at least one cell"),
        (0, 1, "must be positive"),
        (-5, 1, "must be positive"),
        (5, 0, "must be positive"),
        (5, -2, "must be positive"),
    ],
)
def test_invalid_partitions_are_rejected(n: int, parts: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        block_counts(n, parts)
    with pytest.raises(ValueError, match=match):
        block_range(n, parts, 0)


@pytest.mark.parametrize("index", [-1, 4, 100])
def test_block_index_out_of_range(index: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        block_range(10, 4, index)
