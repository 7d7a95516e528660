"""Compiled inner loops of the k-mer kernel: parse + encode, partition by owner, count.

k-mers are 2-bit encoded (A=0, C=1, G=2, T=3) into a uint64, so k <= 31 and, for equal k,
numeric order is lexicographic order: the canonical k-mer (the lexicographic min of a k-mer and
its reverse complement) is the numeric min of the two codes, both maintained incrementally as
the sequence is scanned. Counts live in an open-addressing hash table (linear probing) keyed by
code; `EMPTY` (all ones) can never be a code because codes use at most 62 bits. Each probe is
a cache miss in a table much larger than the caches, so the slot of the k-mer
`PREFETCH_AHEAD` places on is prefetched (`mpi_jobs.prefetch`) to keep several misses in flight.
"""

from __future__ import annotations

import numpy as np

from mpi_jobs.jit import jit
from mpi_jobs.prefetch import prefetch_row

MAX_K = 31
EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
# How many k-mers ahead a table slot is prefetched: enough misses in flight to cover DRAM
# latency, few enough that the lines are still cached when the probe comes (measured on 18M
# k-mers: 0.52 s without, 0.34 s at 16 or 32, 0.39 s at 8).
PREFETCH_AHEAD = 16
FAST_GROWTH_BELOW = 1 << 22  # table rows (64 MiB): see `CountTable._grow`

# Parse errors (codes returned by `extract`), with the byte offset of the offending record.
(ERR_NONE, ERR_HEADER, ERR_SEPARATOR, ERR_QUALITY, ERR_TRUNCATED, ERR_PLUS_TITLE,
 ERR_QUALITY_CHAR, ERR_HEADER_LONG) = range(8)
# Longest FASTA header line accepted. Chunk boundaries inside a record are found by looking
# back at most `fastx.LOOKBACK` bytes for the line start; the bound on headers makes that exact.
MAX_HEADER_BYTES = 1 << 15

_LUT = np.full(256, 4, dtype=np.uint8)
for _i, _c in enumerate(b"ACGT"):
    _LUT[_c] = _i
    _LUT[_c | 0x20] = _i  # lower case (soft-masked) counts as upper case
BASE_CODES = _LUT


@jit
def _mix(x):  # type: ignore[no-untyped-def]
    """splitmix64's finaliser: a bijection on uint64 whose output bits all depend on all input
    bits, so both the owner (high bits) and the table slot (low bits) are well spread."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@jit
def _scan_bases(data, lo, hi, lut, k, mask, shift, fwd, rc, valid, out, n, starts):  # type: ignore[no-untyped-def]
    """Roll the k-mer over ``data[lo:hi]``. With an empty `starts`, `out` gets canonical codes;
    otherwise forward codes, and ``starts[n]`` is 1 where a k-mer does not overlap the one
    before it (a run of ACGT begins), which is what `mpi_jobs.kmer_bins` cuts super-k-mers on."""
    forward = starts.shape[0] > 0
    for p in range(lo, hi):
        code = lut[data[p]]
        if code > 3:
            if data[p] == 13:  # '\r' of a CRLF line end: not a base, not a break
                continue
            valid = 0
            continue
        c = np.uint64(code)
        fwd = ((fwd << np.uint64(2)) | c) & mask
        rc = (rc >> np.uint64(2)) | ((np.uint64(3) - c) << shift)
        valid += 1
        if valid >= k:
            if forward:
                out[n] = fwd
                starts[n] = valid == k
            else:
                out[n] = fwd if fwd < rc else rc
            n += 1
    return fwd, rc, valid, n


@jit
def _extract(data, fmt, k, lut, out, context, in_record, max_header, starts):  # type: ignore[no-untyped-def]
    size = data.shape[0]
    mask = (np.uint64(1) << np.uint64(2 * k)) - np.uint64(1)
    shift = np.uint64(2 * (k - 1))
    # FASTA: the chunk may start inside a record; `context` holds the (at most k - 1) sequence
    # bytes before it, which seed the rolling k-mer without emitting one.
    fwd, rc, valid, n = _scan_bases(context, 0, context.shape[0], lut, k, mask, shift,
                                    np.uint64(0), np.uint64(0), 0, out, 0, starts)
    records = 0
    bases = 0
    line = 0  # FASTQ: line index within the record
    record_start = 0
    header_end = 0
    seq_len = 0
    p = 0
    while p < size:
        q = p
        while q < size and data[q] != 10:
            q += 1
        end = q
        if end > p and data[end - 1] == 13:
            end -= 1
        if fmt == 0:
            if end > p and data[p] == 62:  # '>'
                if end - p > max_header:
                    return n, ERR_HEADER_LONG, p, p, records, bases
                records += 1
                in_record = True
                valid = 0
            elif in_record:
                bases += end - p
                fwd, rc, valid, n = _scan_bases(data, p, end, lut, k, mask, shift, fwd, rc,
                                                valid, out, n, starts)
        else:
            if line == 0:
                if end == p:  # blank line between records
                    p = q + 1
                    continue
                if data[p] != 64:  # '@'
                    return n, ERR_HEADER, p, p, records, bases
                record_start = p
                header_end = end
                records += 1
            elif line == 1:
                seq_len = end - p
                bases += seq_len
                valid = 0
                fwd, rc, valid, n = _scan_bases(data, p, end, lut, k, mask, shift, fwd, rc,
                                                valid, out, n, starts)
            elif line == 2:
                if end == p or data[p] != 43:  # '+'
                    return n, ERR_SEPARATOR, p, record_start, records, bases
                if end - p > 1:  # '+title' must repeat the header's title (as Biopython)
                    title = header_end - record_start - 1
                    same = end - p - 1 == title
                    i = 0
                    while same and i < title:
                        same = data[p + 1 + i] == data[record_start + 1 + i]
                        i += 1
                    if not same:
                        return n, ERR_PLUS_TITLE, p, record_start, records, bases
            else:
                if end - p != seq_len:
                    return n, ERR_QUALITY, p, record_start, records, bases
                for i in range(p, end):
                    if data[i] < 33 or data[i] > 126:  # Sanger/Illumina: '!' .. '~' only
                        return n, ERR_QUALITY_CHAR, i, record_start, records, bases
            line = (line + 1) & 3
        p = q + 1
    if fmt == 1 and line != 0:
        return n, ERR_TRUNCATED, record_start, record_start, records, bases
    return n, ERR_NONE, 0, 0, records, bases


_NO_CONTEXT = np.empty(0, dtype=np.uint8)


def extract(  # type: ignore[no-untyped-def]
    data, fmt, k, lut, out, context=None, in_record=False, max_header=MAX_HEADER_BYTES,
    starts=None,
):
    """Canonical k-mer codes of every record in `data` into `out`.

    Returns ``(n_kmers, error, error_offset, record_offset, records, bases)``; `fmt` 0 = FASTA,
    1 = FASTQ. `error_offset` is where the fault is (the offending line, or byte of a quality
    line), `record_offset` the start of the record it is in: both index `data`.

    FASTA: sequence continues across line breaks; `data` may start inside a record
    (`in_record`, with the preceding sequence bytes in `context`: see `mpi_jobs.fastx`); lines
    before the first header of a chunk that is not `in_record` are ignored (only blank lines
    can be there: `detect_format` checked the first non-blank character). A header longer
    than `max_header` bytes is an error, which is what lets chunk boundaries be found with a
    bounded look-back. FASTQ: strict 4-line records (header ``@``, sequence, ``+`` optionally
    repeating the header's title, quality as long as the sequence and printable ``!``..``~``);
    anything else is an error. Any non-ACGT character breaks the current k-mer run.

    With `starts` (uint8, as long as `out`), `out` gets each k-mer's forward code instead of
    its canonical one and `starts` marks the first k-mer of each run (see `_scan_bases`).
    """
    ctx = _NO_CONTEXT if context is None else context
    flags = _NO_CONTEXT if starts is None else starts
    return _extract(data, fmt, k, lut, out, ctx, in_record, max_header, flags)


@jit
def partition(codes, n, parts, out, counts):  # type: ignore[no-untyped-def]
    """Counting sort of ``codes[:n]`` by owner rank into `out`; `counts` gets each owner's
    number of codes. Owner = high 32 bits of the mixed code, modulo `parts`."""
    owners = np.empty(n, dtype=np.int64)
    counts[:] = 0
    p64 = np.uint64(parts)
    for i in range(n):
        o = np.int64((_mix(codes[i]) >> np.uint64(32)) % p64)
        owners[i] = o
        counts[o] += 1
    offsets = np.zeros(parts, dtype=np.int64)
    for r in range(1, parts):
        offsets[r] = offsets[r - 1] + counts[r - 1]
    for i in range(n):
        o = owners[i]
        out[offsets[o]] = codes[i]
        offsets[o] += 1


@jit
def insert(slots, codes, weights, start, used, limit):  # type: ignore[no-untyped-def]
    """Add ``weights[i]`` (1 if `weights` is empty) to the count of ``codes[i]``, from `start`.

    `slots` is ``(capacity, 2)``: key and count side by side, so a probe touches one cache
    line, not two. Stops early when `used` reaches `limit` so the caller can grow the table;
    returns ``(next index, used)``.
    """
    mask = np.uint64(slots.shape[0] - 1)
    unit = weights.shape[0] == 0
    n = codes.shape[0]
    for i in range(start, min(start + PREFETCH_AHEAD, n)):
        prefetch_row(slots, _mix(codes[i]) & mask)
    for i in range(start, n):
        if used >= limit:
            return i, used
        if i + PREFETCH_AHEAD < n:
            prefetch_row(slots, _mix(codes[i + PREFETCH_AHEAD]) & mask)
        code = codes[i]
        slot = _mix(code) & mask
        while True:
            key = slots[slot, 0]
            if key == code:
                break
            if key == EMPTY:
                slots[slot, 0] = code
                used += 1
                break
            slot = (slot + np.uint64(1)) & mask
        slots[slot, 1] += np.uint64(1) if unit else np.uint64(weights[i])
    return n, used


@jit
def _init_slots(slots):  # type: ignore[no-untyped-def]
    for s in range(slots.shape[0]):
        slots[s, 0] = EMPTY
        slots[s, 1] = 0


@jit
def _rehash(old, new):  # type: ignore[no-untyped-def]
    """Move every entry of `old` into the (empty, larger) `new`; returns the entry count."""
    mask = np.uint64(new.shape[0] - 1)
    used = 0
    for s in range(old.shape[0]):
        ahead = s + PREFETCH_AHEAD
        if ahead < old.shape[0] and old[ahead, 0] != EMPTY:
            prefetch_row(new, _mix(old[ahead, 0]) & mask)
        code = old[s, 0]
        if code == EMPTY:
            continue
        slot = _mix(code) & mask
        while new[slot, 0] != EMPTY:
            slot = (slot + np.uint64(1)) & mask
        new[slot, 0] = code
        new[slot, 1] = old[s, 1]
        used += 1
    return used


@jit
def _compact(slots, used):  # type: ignore[no-untyped-def]
    keys = np.empty(used, dtype=np.uint64)
    vals = np.empty(used, dtype=np.int64)
    n = 0
    for s in range(slots.shape[0]):
        if slots[s, 0] != EMPTY:
            keys[n] = slots[s, 0]
            vals[n] = slots[s, 1]
            n += 1
    return keys[:n], vals[:n]


class CountTable:
    """Growable hash table of k-mer code -> count (the owner side of the exchange)."""

    def __init__(self, capacity: int = 1 << 18, load: float = 0.6) -> None:
        self.slots = self._empty(1 << max(4, (capacity - 1).bit_length()))
        self.used = 0
        self.load = load

    @staticmethod
    def _empty(capacity: int) -> np.ndarray:
        slots = np.empty((capacity, 2), dtype=np.uint64)
        _init_slots(slots)
        return slots

    def _grow(self) -> None:
        # x4 while the table is small (a table that grew once will likely grow again: fewer
        # rehashes), x2 once it is big: then memory, and the cost of faulting in fresh pages
        # (which dominated the growth of a 256 MiB table here), matter more than one rehash.
        rows = self.slots.shape[0]
        bigger = self._empty(rows * (4 if rows < FAST_GROWTH_BELOW else 2))
        self.used = _rehash(self.slots, bigger)
        self.slots = bigger

    def add(self, codes: np.ndarray, weights: np.ndarray | None = None) -> None:
        w = np.empty(0, dtype=np.int64) if weights is None else weights.astype(np.int64)
        i = 0
        while i < codes.shape[0]:
            limit = int(self.slots.shape[0] * self.load)
            i, self.used = insert(self.slots, codes, w, i, self.used, limit)
            if i < codes.shape[0]:
                self._grow()

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """``(codes, counts)`` of the k-mers in the table, in no particular order."""
        return _compact(self.slots, self.used)  # type: ignore[no-any-return]
