"""k-mer counting of long FASTA records: chunks cut inside a record, each read exactly once.

Issue 13 class 8 ("scaling"): a FASTA of one long record took superlinear time because every
chunk scanned forward to the next header, i.e. to the end of the record. Now a chunk boundary
inside a sequence stays where it is and the chunk carries the k-1 bases before it as context.
The time per base is measured in ``bench/kernels_kmer_long.py``; here the tests show that the
counts are exact for any cut and that no chunk reads more than its own bytes and a bounded
look-back.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mpi_jobs.fastx import FASTA, LOOKBACK, PlainSource, read_chunk
from mpi_jobs.genome import Record, random_genome, write_records
from mpi_jobs.kmer import decode
from mpi_jobs.kmer_numba import BASE_CODES, ERR_HEADER_LONG, ERR_NONE, MAX_HEADER_BYTES, extract
from mpi_jobs.kmer_reference import count_kmers, top
from tests.kernel_launch import run_ok


class _CountingSource(PlainSource):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.requests: list[int] = []

    def read_at(self, offset: int, size: int) -> bytes:
        self.requests.append(size)
        return super().read_at(offset, size)


def _one_record(path: Path, length: int, seed: int, width: int) -> Path:
    genome = random_genome(length, seed=seed)
    return write_records(path, [Record("chr1 one long record", genome)], "fasta", width=width)


def _count_in_chunks(path: Path, k: int, chunk_bytes: int) -> tuple[Counter[str], list[int]]:
    source = _CountingSource(path)
    counts: Counter[str] = Counter()
    index = 0
    while (chunk := read_chunk(source, index, chunk_bytes, FASTA, k)) is not None:
        out = np.empty(len(chunk.data) + 1, dtype=np.uint64)
        n, err, *_ = extract(np.frombuffer(chunk.data, dtype=np.uint8), FASTA, k, BASE_CODES,
                             out, np.frombuffer(chunk.context, dtype=np.uint8), chunk.in_record)
        assert err == ERR_NONE
        counts.update(decode(out[:n], k))
        index += 1
    source.close()
    return counts, source.requests


@pytest.mark.parametrize("layout", ["wrapped", "one-line", "crlf-blank-lines"])
def test_any_cut_inside_a_record_counts_every_kmer_once(tmp_path: Path, layout: str) -> None:
    path = _one_record(tmp_path / "chr.fa", 6000, seed=4, width=10**9 if layout == "one-line"
                       else 61)
    if layout == "crlf-blank-lines":
        text = path.read_bytes().replace(b"\n", b"\r\n")
        # Blank lines inside a record do not break a k-mer (as in the serial reference).
        path.write_bytes(text.replace(b"A\r\n", b"A\r\n\r\n\n", 7))
    for k in (1, 2, 17, 31):
        expected = count_kmers(path, k)
        for chunk_bytes in (1, 2, 5, 64, 997, 1 << 20):
            counts, _ = _count_in_chunks(path, k, chunk_bytes)
            assert counts == expected, (k, chunk_bytes)


def test_no_chunk_reads_past_its_own_bytes_and_the_lookback(tmp_path: Path) -> None:
    # The old rule read each chunk of a single-record FASTA up to the end of the record: the
    # request grew with the file. Now every chunk is one read of a bounded size.
    path = _one_record(tmp_path / "chr.fa", 400_000, seed=5, width=80)
    chunk_bytes = 4096
    chunks = -(-path.stat().st_size // chunk_bytes)
    _, requests = _count_in_chunks(path, 21, chunk_bytes)
    assert len(requests) == chunks + 1  # one read per chunk, one to find the end
    assert max(requests) <= chunk_bytes + LOOKBACK + 2


@pytest.mark.parametrize(("ranks", "width"), [(1, 60), (2, 10**9), (3, 70)])
def test_long_record_counts_match_serial_on_any_rank_count(
    tmp_path: Path, ranks: int, width: int
) -> None:
    path = _one_record(tmp_path / "chr.fa", 40_000, seed=ranks, width=width)
    out = tmp_path / "out"
    run_ok("kmer", ranks, ["--input", str(path), "--k", "13", "--top", "0", "--chunk-bytes",
                           "777", "--out", str(out)])
    counts = count_kmers(path, 13)
    expected = "".join(f"{kmer}\t{c}\n" for kmer, c in top(counts, 0))
    assert (out / "counts.tsv").read_text() == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"] == 1 and manifest["bases"] == 40_000
    assert manifest["kmers"] == sum(counts.values())


def test_overlong_fasta_header_is_refused() -> None:
    # The bound that makes the look-back exact: a header longer than it is an error wherever
    # it lies, so a boundary can never be placed inside an accepted header.
    ok = b">" + b"x" * (MAX_HEADER_BYTES - 1) + b"\nACGT\n"
    long = b">" + b"x" * MAX_HEADER_BYTES + b"\nACGT\n"
    out = np.empty(16, dtype=np.uint64)
    assert extract(np.frombuffer(ok, dtype=np.uint8), FASTA, 2, BASE_CODES, out)[1] == ERR_NONE
    result = extract(np.frombuffer(long, dtype=np.uint8), FASTA, 2, BASE_CODES, out)
    assert result[1] == ERR_HEADER_LONG and result[2] == 0
    assert MAX_HEADER_BYTES + 2 <= LOOKBACK  # a header line and its CRLF fit the window
