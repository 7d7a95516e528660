"""A rank's received super-k-mer records and the per-bin counting that folds them into results.

Apart from the kernel's round loop (`mpi_jobs.kmer`) because this is the memory side of the
k-mer count: how much a rank reserves for what it receives, how many bins keep each bin's
table in cache, and how counted bins become the histogram and top list without a rank ever
holding all its (k-mer, count) pairs.
"""

from __future__ import annotations

import os

import numpy as np

BIN_INPUT_BYTES = 128 << 10  # input bytes per bin (see `bins_per_rank`)
MAX_BINS_PER_RANK = 1 << 14
LOAD_HINT = 0.7  # kmer_bins.LOAD


class Store:
    """This rank's received records: one byte buffer, and per received block the offset of
    each of this rank's bins in it. Capacity is reserved generously (pages never written cost
    no memory) so the buffer is rarely copied while it grows."""

    def __init__(self, per: int, projected: int = 0) -> None:
        self.per = per
        self.data = np.empty(max(projected, 1 << 16), dtype=np.uint8)
        self.used = 0
        self.blocks: list[np.ndarray] = []
        self.projected = projected

    def reserve(self, nbytes: int) -> int:
        """Make room for `nbytes` more; returns where they go."""
        need = self.used + nbytes
        if need > self.data.size:
            grown = np.empty(max(need + need // 2, self.projected), dtype=np.uint8)
            grown[: self.used] = self.data[: self.used]
            self.data = grown
        at = self.used
        self.used = need
        return at

    def add_block(self, at: int, bin_bytes: np.ndarray) -> None:
        offsets = np.empty(self.per + 1, dtype=np.int64)
        offsets[0] = at
        np.cumsum(bin_bytes, out=offsets[1:])
        offsets[1:] += at
        self.blocks.append(offsets)

    def offsets(self) -> np.ndarray:
        if not self.blocks:
            return np.zeros((0, self.per + 1), dtype=np.int64)
        return np.stack(self.blocks)

    def load(self, data: np.ndarray, offsets: np.ndarray) -> None:
        at = self.reserve(data.size)
        self.data[at : at + data.size] = data
        self.blocks = [row + at for row in offsets]


def projected_store(input_bytes: int, k: int, ranks: int, chunk_bytes: int) -> int:
    """Record bytes a rank can expect: at most ~1 per input byte (FASTA at k > 12: records of
    several k-mers, 2 bits a base) and up to 4 for short k (a record per k-mer). It is
    reserved, never touched unless used, so erring high costs address space, not memory;
    capped at half the machine's memory so the reservation itself is never refused."""
    from mpi_jobs.kmer_bins import record_bound

    per_byte = 1.1 if k > 12 else 4.0
    want = int(input_bytes * per_byte / ranks) + chunk_bytes * record_bound(k)
    try:
        half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (OSError, ValueError):
        half = want
    return min(want, half)


def bins_per_rank(input_bytes: int, ranks: int) -> int:
    """Enough bins that one bin's table (~1 distinct k-mer per 10 input bytes of 15x-covered
    reads, far fewer than that for a genome) stays in a core's cache: ~`BIN_INPUT_BYTES` of
    input a bin."""
    return int(min(MAX_BINS_PER_RANK, max(16, -(-input_bytes // (BIN_INPUT_BYTES * ranks)))))


class Results:
    """Folds each counted bin into the histogram and the top list as it comes, so a rank
    never holds all its (k-mer, count) pairs unless the full dump asks for them."""

    SMALL = 1 << 16

    def __init__(self, top: int) -> None:
        self.top = top
        self.tally = np.zeros(self.SMALL, dtype=np.int64)
        self.big: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.pending = 0
        self.threshold = 0
        self.distinct = 0

    def add(self, keys: np.ndarray, vals: np.ndarray) -> None:
        if not vals.size:
            return
        self.distinct += vals.size
        if int(vals.max()) < self.SMALL:
            tally = np.bincount(vals)
        else:
            self.big.append(vals[vals >= self.SMALL])
            tally = np.bincount(vals[vals < self.SMALL])
        self.tally[: tally.size] += tally
        if self.top == 0:
            self.keys.append(keys)
            self.vals.append(vals)
            return
        if self.threshold:
            keep = vals >= self.threshold
            keys, vals = keys[keep], vals[keep]
        self.keys.append(keys)
        self.vals.append(vals)
        self.pending += vals.size
        if self.pending > 4 * self.top + 4096:
            self._prune()

    def _prune(self) -> None:
        keys, vals = top_by_count(np.concatenate(self.keys), np.concatenate(self.vals), self.top)
        self.keys, self.vals, self.pending = [keys], [vals], vals.size
        if vals.size == self.top:
            self.threshold = int(vals[-1])

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        present = np.flatnonzero(self.tally)
        counts, kmers = present, self.tally[present]
        if self.big:
            more, tally = np.unique(np.concatenate(self.big), return_counts=True)
            counts, kmers = np.concatenate([counts, more]), np.concatenate([kmers, tally])
        return counts, kmers

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every entry (the full dump) or this rank's top candidates."""
        if not self.keys:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        keys, vals = np.concatenate(self.keys), np.concatenate(self.vals)
        self.keys, self.vals = [], []
        return keys, vals


def count_bins(store: Store, k: int, results: Results) -> None:
    """Count every bin of this rank, one at a time, in a cache-sized table."""
    from mpi_jobs.kmer_bins import count_bin, table_items

    offsets = store.offsets()
    bin_bytes = (offsets[:, 1:] - offsets[:, :-1]).sum(axis=0)
    table = np.empty((1 << 12, 2), dtype=np.uint64)
    ratio = 1.0  # distinct k-mers per record byte so far: sizes the next bin's table
    seen_bytes = seen_distinct = 0
    for b in range(store.per):
        if not bin_bytes[b]:
            continue
        want = max(1 << 10, 1 << int(bin_bytes[b] * ratio * 1.2 / LOAD_HINT).bit_length())
        if want > table.shape[0]:
            table = np.empty((want, 2), dtype=np.uint64)
        table, rows, used = count_bin(store.data, offsets, b, k, table, want)
        results.add(*table_items(table, rows, used))
        seen_bytes += int(bin_bytes[b])
        seen_distinct += used
        ratio = seen_distinct / seen_bytes


def top_by_count(codes: np.ndarray, counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n` most frequent (all if n == 0), by count descending then k-mer.

    A partition finds the n-th largest count first, so only the candidates at or above it
    (all of the top n, plus any ties) are fully sorted.
    """
    if n and n < counts.size:
        threshold = np.partition(counts, counts.size - n)[counts.size - n]
        keep = np.flatnonzero(counts >= threshold)
        codes, counts = codes[keep], counts[keep]
    order = np.lexsort((codes, -counts))
    if n:
        order = order[:n]
    return codes[order], counts[order]
