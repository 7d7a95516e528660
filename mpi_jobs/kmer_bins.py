"""Minimizer bins for the k-mer kernel: super-k-mers packed 2 bits a base, counted bin by bin.

Why: counting every k-mer occurrence straight into one hash table as large as the result
(16 B a row at load 0.6: 512 MiB for 11 M distinct k-mers) makes each insert a DRAM miss and
the table the largest thing in memory. KMC's way instead: consecutive k-mers of a read mostly
share their *minimizer* (the m-mer of least hash in the k-mer), so a read is cut into
super-k-mers, maximal runs of k-mers with the same minimizer, and each run is stored once,
2 bits a base (about 1.2 B a k-mer occurrence for 150 bp reads at k = 21, against 8 B for a
code). The minimizer picks the run's bin; once the input is read, every bin is counted alone
in a small table that stays in cache, and its entries go straight into the histogram and
top list, so the full table never exists (only `--top 0` keeps every entry).

A k-mer and its reverse complement hold the same canonical m-mers, so both get the same
minimizer, bin and owner rank: each canonical k-mer is counted in exactly one bin, whatever the
chunking or rank count, and the counts are exact. Ties between equal hashes do not matter: the
bin depends on the least hash value, not on where it is.

Record layout (one super-k-mer): one byte ``n - 1`` (n k-mers, at most `MAX_RUN`), then its
``k + n - 1`` bases, 4 to a byte, first base in the high bits. A round's records are sorted by
bin, so each owner rank's records are one contiguous, 4-byte aligned, slice of the send buffer
(sent as uint32 words, which keeps ``MPI_Alltoallv``'s int counts 4x further from 2**31).
"""

from __future__ import annotations

import numpy as np

from mpi_jobs.jit import jit
from mpi_jobs.kmer_numba import EMPTY, _mix

MAX_RUN = 256  # k-mers in one record (its length byte holds n - 1)
MINIMIZER = 9  # m: 4**9 / 2 canonical m-mers, far more than there are bins
LOAD = 0.7  # a bin table's fill before it doubles (it is small and cached: probes are cheap)


def minimizer_length(k: int) -> int:
    return min(k, MINIMIZER)


def record_bound(k: int) -> int:
    """Most bytes a record takes per k-mer it holds (a record of one k-mer)."""
    return 1 + (k + 3) // 4


@jit
def split_runs(fwd, starts, n, k, m, nbins, first, length, bins):  # type: ignore[no-untyped-def]
    """Cut ``fwd[:n]`` (forward codes, `starts` marking run starts) into super-k-mers.

    Writes each record's first k-mer index, k-mer count and bin; returns the record count.
    The minimizer is kept incrementally: each new k-mer adds one m-mer to a window of
    ``w = k - m + 1``; the window is rescanned only when its least hash falls out of it.
    """
    w = k - m + 1
    mmask = (np.uint64(1) << np.uint64(2 * m)) - np.uint64(1)
    top = np.uint64(2 * (k - 1))
    rc_last = np.uint64(2 * (k - m))  # the last m-mer's reverse complement is rc's high bits
    nb = np.uint64(nbins)
    ring = np.empty(32, dtype=np.uint64)  # hashes of the last w m-mers, by m-mer index & 31
    rc = np.uint64(0)
    least = np.uint64(0)
    least_at = 0
    p = 0  # m-mer index of the current k-mer's last m-mer
    records = 0
    current = -1
    for i in range(n):
        f = fwd[i]
        if starts[i]:
            rc = np.uint64(0)
            x = f
            for _ in range(k):
                rc = (rc << np.uint64(2)) | (np.uint64(3) - (x & np.uint64(3)))
                x >>= np.uint64(2)
            p = w - 1
            least = EMPTY
            for j in range(w):
                fm = (f >> np.uint64(2 * (w - 1 - j))) & mmask
                rm = (rc >> np.uint64(2 * j)) & mmask
                h = _mix(fm if fm < rm else rm)
                ring[j & 31] = h
                if h <= least:
                    least = h
                    least_at = j
        else:
            rc = (rc >> np.uint64(2)) | ((np.uint64(3) - (f & np.uint64(3))) << top)
            p += 1
            fm = f & mmask
            rm = rc >> rc_last
            h = _mix(fm if fm < rm else rm)
            ring[p & 31] = h
            if h <= least:
                least = h
                least_at = p
            elif least_at <= p - w:
                least = EMPTY
                for j in range(p - w + 1, p + 1):
                    if ring[j & 31] <= least:
                        least = ring[j & 31]
                        least_at = j
        b = np.int64((least >> np.uint64(32)) % nb)
        if starts[i] or b != current or length[records - 1] == MAX_RUN:
            first[records] = i
            length[records] = 1
            bins[records] = b
            records += 1
            current = b
        else:
            length[records - 1] += 1
    return records


@jit
def pack_runs(fwd, first, length, bins, records, k, nbins, parts, out, bin_bytes, part_bytes):  # type: ignore[no-untyped-def]
    """Write the records into `out` sorted by bin, each part's slice 4-byte aligned.

    Bins ``[r * nbins / parts, (r + 1) * nbins / parts)`` belong to part (rank) r. Fills
    `bin_bytes` (bytes per bin) and `part_bytes` (aligned bytes per part); returns the total.
    """
    bin_bytes[:] = 0
    for s in range(records):
        bin_bytes[bins[s]] += 1 + (k + length[s] + 2) // 4
    per = nbins // parts
    offsets = np.empty(nbins, dtype=np.int64)
    pos = 0
    for r in range(parts):
        start = pos
        for b in range(r * per, (r + 1) * per):
            offsets[b] = pos
            pos += bin_bytes[b]
        pos = (pos + 3) & ~3
        part_bytes[r] = pos - start
    for s in range(records):
        o = offsets[bins[s]]
        n = length[s]
        out[o] = n - 1
        o += 1
        code = fwd[first[s]]
        acc = 0
        filled = 0
        for t in range(k + n - 1):
            if t < k:
                base = (code >> np.uint64(2 * (k - 1 - t))) & np.uint64(3)
            else:
                base = fwd[first[s] + t - k + 1] & np.uint64(3)
            acc = (acc << 2) | np.int64(base)
            filled += 1
            if filled == 4:
                out[o] = acc
                o += 1
                acc = 0
                filled = 0
        if filled:
            out[o] = acc << (2 * (4 - filled))
            o += 1
        offsets[bins[s]] = o
    return pos


@jit
def _revcomp(x, k):  # type: ignore[no-untyped-def]
    """Reverse complement of a k-mer code: complement every base, reverse the 2-bit groups."""
    x = ~x
    x = (((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
         | ((x & np.uint64(0x3333333333333333)) << np.uint64(2)))
    x = (((x >> np.uint64(4)) & np.uint64(0x0F0F0F0F0F0F0F0F))
         | ((x & np.uint64(0x0F0F0F0F0F0F0F0F)) << np.uint64(4)))
    x = (((x >> np.uint64(8)) & np.uint64(0x00FF00FF00FF00FF))
         | ((x & np.uint64(0x00FF00FF00FF00FF)) << np.uint64(8)))
    x = (((x >> np.uint64(16)) & np.uint64(0x0000FFFF0000FFFF))
         | ((x & np.uint64(0x0000FFFF0000FFFF)) << np.uint64(16)))
    x = (x >> np.uint64(32)) | (x << np.uint64(32))
    return x >> np.uint64(64 - 2 * k)


@jit
def _clear(table, rows):  # type: ignore[no-untyped-def]
    for s in range(rows):
        table[s, 0] = EMPTY
        table[s, 1] = 0


@jit
def _grown(table, rows):  # type: ignore[no-untyped-def]
    """The first `rows` rows of `table` rehashed into ``2 * rows`` rows (a new array when
    `table` is too small, else `table` itself, after copying the old rows out)."""
    old = table[:rows].copy()
    bigger = rows * 2
    grown = np.empty((bigger, 2), dtype=np.uint64) if bigger > table.shape[0] else table
    _clear(grown, bigger)
    mask = np.uint64(bigger - 1)
    for s in range(rows):
        key = old[s, 0]
        if key == EMPTY:
            continue
        slot = _mix(key) & mask
        while grown[slot, 0] != EMPTY:
            slot = (slot + np.uint64(1)) & mask
        grown[slot, 0] = key
        grown[slot, 1] = old[s, 1]
    return grown


@jit
def count_bin(store, offsets, b, k, table, rows):  # type: ignore[no-untyped-def]
    """Count the canonical k-mers of bin `b` (slices ``offsets[j, b]:offsets[j, b + 1]`` of
    `store`, one per received block) in the first `rows` rows of `table` (``(cap, 2)``: key and
    count side by side). Doubles the table when it passes `LOAD`; returns ``(table, rows,
    distinct)``, the table possibly a new, larger one.

    A record's first k-mer is read whole and its reverse complement computed by bit reversal;
    each further base then rolls both codes, so the inner loop has no per-base branch but the
    probe's.
    """
    _clear(table, rows)
    mask = np.uint64(rows - 1)
    limit = int(rows * LOAD)
    used = 0
    kmask = (np.uint64(1) << np.uint64(2 * k)) - np.uint64(1)
    top = np.uint64(2 * (k - 1))
    for j in range(offsets.shape[0]):
        p = offsets[j, b]
        end = offsets[j, b + 1]
        while p < end:
            nbases = k + np.int64(store[p])
            p += 1
            fwd = np.uint64(0)
            for t in range(k):
                fwd = (fwd << np.uint64(2)) | np.uint64((store[p + (t >> 2)] >> (6 - 2 * (t & 3)))
                                                        & 3)
            rc = _revcomp(fwd, k)
            t = k
            while True:
                code = fwd if fwd < rc else rc
                slot = _mix(code) & mask
                while True:
                    key = table[slot, 0]
                    if key == code:
                        break
                    if key == EMPTY:
                        table[slot, 0] = code
                        used += 1
                        break
                    slot = (slot + np.uint64(1)) & mask
                table[slot, 1] += np.uint64(1)
                if used >= limit:
                    table = _grown(table, rows)
                    rows *= 2
                    mask = np.uint64(rows - 1)
                    limit = int(rows * LOAD)
                if t == nbases:
                    break
                c = np.uint64((store[p + (t >> 2)] >> (6 - 2 * (t & 3))) & 3)
                fwd = ((fwd << np.uint64(2)) | c) & kmask
                rc = (rc >> np.uint64(2)) | ((np.uint64(3) - c) << top)
                t += 1
            p += (nbases + 3) >> 2
    return table, rows, used


@jit
def table_items(table, rows, used):  # type: ignore[no-untyped-def]
    """``(codes, counts)`` of the first `rows` rows of a bin table, in no particular order."""
    keys = np.empty(used, dtype=np.uint64)
    vals = np.empty(used, dtype=np.int64)
    n = 0
    for s in range(rows):
        if table[s, 0] != EMPTY:
            keys[n] = table[s, 0]
            vals[n] = table[s, 1]
            n += 1
    return keys, vals
