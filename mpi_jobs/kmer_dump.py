"""The full k-mer dump (``--top 0``), streamed: a k-way merge of per-rank sorted runs.

Why: gathering every rank's table on rank 0 and formatting one string needs memory for the
whole result in one process (3.6 GB for 90 Mbase of reads). Instead each rank sorts its own
table (count descending, then k-mer: the output order) and sends it to rank 0 in blocks of
`BLOCK` entries; rank 0 merges the runs block by block and writes the lines as it goes. Rank 0
holds at most one block per rank besides its own run, so every rank stays within the memory
its share of the count needs, and no shared filesystem is assumed between ranks.

The merge: among the current blocks, the smallest last entry (the "frontier") bounds what
is safe to write, since every later entry of every run sorts after its block's last entry.
All entries up to the frontier are taken from every block, sorted together and written; the
run that held the frontier has its block used up, so each step consumes at least one block.
Codes are unique across runs (a k-mer has one owner), so the order is total and the file is
the same for any rank count.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

import numpy as np

from mpi_jobs.jit import jit

if TYPE_CHECKING:
    from mpi4py import MPI

BLOCK = 1 << 16  # entries per message: 1 MiB of (code, count) pairs
TAG = 0x6B6D  # "km"
_LETTERS = np.frombuffer(b"ACGT", dtype=np.uint8)


def sort_run(keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """This rank's entries in output order: count descending, then code (= k-mer) ascending."""
    order = np.lexsort((keys, -vals))
    return keys[order], vals[order]


@jit
def format_lines(codes, counts, k, out):  # type: ignore[no-untyped-def]
    """Write ``kmer<TAB>count<NL>`` lines into `out` (uint8, large enough); return bytes."""
    pos = 0
    digits = np.empty(20, dtype=np.uint8)
    for i in range(codes.shape[0]):
        code = codes[i]
        for j in range(k):
            out[pos + j] = _LETTERS[(code >> np.uint64(2 * (k - 1 - j))) & np.uint64(3)]
        pos += k
        out[pos] = 9
        pos += 1
        value = counts[i]
        nd = 0
        while True:
            digits[nd] = 48 + value % 10
            nd += 1
            value //= 10
            if value == 0:
                break
        for j in range(nd):
            out[pos + j] = digits[nd - 1 - j]
        pos += nd
        out[pos] = 10
        pos += 1
    return pos


def write_lines(fh: IO[bytes], codes: np.ndarray, counts: np.ndarray, k: int) -> None:
    if codes.size:
        buf = np.empty(codes.size * (k + 22), dtype=np.uint8)
        n = format_lines(codes, counts.astype(np.int64), k, buf)
        fh.write(buf[:n].tobytes())


def send_run(comm: MPI.Intracomm, keys: np.ndarray, vals: np.ndarray) -> None:
    """Non-root ranks: send the sorted run to rank 0 in blocks, then an empty block."""
    from mpi4py import MPI

    for i in range(0, keys.size, BLOCK):
        block = np.empty((min(BLOCK, keys.size - i), 2), dtype=np.uint64)
        block[:, 0] = keys[i : i + BLOCK]
        block[:, 1] = vals[i : i + BLOCK]
        comm.Send([block, MPI.UINT64_T], dest=0, tag=TAG)
    comm.Send([np.empty((0, 2), dtype=np.uint64), MPI.UINT64_T], dest=0, tag=TAG)


class _Run:
    """One rank's sorted run as seen by rank 0: the current block and how to get the next."""

    def __init__(self, comm: MPI.Intracomm, source: int, keys: np.ndarray | None = None,
                 vals: np.ndarray | None = None) -> None:
        self.comm = comm
        self.source = source
        self.local = (keys, vals) if keys is not None and vals is not None else None
        self.local_pos = 0
        self.codes = np.empty(0, dtype=np.uint64)
        self.neg = np.empty(0, dtype=np.int64)  # -count, ascending within a block
        self.done = False
        self.refill()

    def refill(self) -> None:
        if self.local is not None:
            keys, vals = self.local
            i = self.local_pos
            self.codes = keys[i : i + BLOCK]
            self.neg = -vals[i : i + BLOCK].astype(np.int64)
            self.local_pos = i + self.codes.size
        else:
            from mpi4py import MPI

            status = MPI.Status()
            self.comm.Probe(source=self.source, tag=TAG, status=status)
            block = np.empty((status.Get_count(MPI.UINT64_T) // 2, 2), dtype=np.uint64)
            self.comm.Recv([block, MPI.UINT64_T], source=self.source, tag=TAG)
            self.codes = np.ascontiguousarray(block[:, 0])
            self.neg = -block[:, 1].astype(np.int64)
        self.done = self.codes.size == 0

    def last(self) -> tuple[int, int]:
        return int(self.neg[-1]), int(self.codes[-1])

    def take_through(self, neg: int, code: int) -> tuple[np.ndarray, np.ndarray]:
        """Remove and return this block's entries that sort at or before ``(neg, code)``."""
        lo = int(np.searchsorted(self.neg, neg, "left"))
        hi = int(np.searchsorted(self.neg, neg, "right"))
        cut = lo + int(np.searchsorted(self.codes[lo:hi], np.uint64(code), "right"))
        taken = self.codes[:cut], self.neg[:cut]
        self.codes, self.neg = self.codes[cut:], self.neg[cut:]
        if self.codes.size == 0:
            self.refill()
        return taken


def merge_runs(
    comm: MPI.Intracomm, fh: IO[bytes], keys: np.ndarray, vals: np.ndarray, k: int
) -> int:
    """Rank 0: merge its own sorted run with every other rank's into `fh`; returns lines."""
    runs = [_Run(comm, 0, keys, vals)] + [_Run(comm, r) for r in range(1, comm.Get_size())]
    live = [run for run in runs if not run.done]
    written = 0
    while live:
        frontier = min(run.last() for run in live)
        pieces = [run.take_through(*frontier) for run in live]
        codes = np.concatenate([p[0] for p in pieces])
        neg = np.concatenate([p[1] for p in pieces])
        order = np.lexsort((codes, neg))
        write_lines(fh, codes[order], -neg[order], k)
        written += codes.size
        live = [run for run in live if not run.done]
    return written
