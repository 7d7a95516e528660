"""k-mer counting: parsing, chunking and counting in-process; the MPI kernel via mpiexec."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mpi_jobs.fastx import FASTA, FASTQ, GzipSource, PlainSource, detect_format, read_chunk
from mpi_jobs.genome import Record, write_reads, write_records
from mpi_jobs.kmer import _parse_args, decode
from mpi_jobs.kmer_numba import BASE_CODES, ERR_QUALITY, CountTable, extract, partition
from mpi_jobs.kmer_reference import count_kmers, histogram, top
from tests.kernel_launch import (
    kernel_lines,
    kill_one_rank_once,
    newest_checkpoint_step,
    run,
    run_ok,
    start,
)


def _extract(data: bytes, fmt: int, k: int) -> tuple[list[str], int]:
    out = np.empty(len(data) + 1, dtype=np.uint64)
    n, err, _, _, _, _ = extract(np.frombuffer(data, dtype=np.uint8), fmt, k, BASE_CODES, out)
    return decode(out[:n], k), err


def _expected_tsv(path: Path, k: int, n: int = 0) -> tuple[str, str]:
    counts = count_kmers(path, k)
    return (
        "".join(f"{kmer}\t{c}\n" for kmer, c in top(counts, n)),
        "".join(f"{c}\t{m}\n" for c, m in histogram(counts)),
    )


# --------------------------------------------------------------------------- in-process


def test_extract_canonicalises_and_skips_non_acgt() -> None:
    # 'n' breaks the run; lower case counts;
    # a FASTA record continues across a line break (CRLF too) but not across records.
    fasta = b">r1 x\r\nAAcG\r\nTnAC\n>r2\nGTT\n"
    kmers, err = _extract(fasta, FASTA, 3)
    assert err == 0
    # r1 reads AACGT (then N breaks it): AAC, ACG, CGT -> ACG; r2 reads GTT -> AAC.
    assert kmers == ["AAC", "ACG", "ACG", "AAC"]


def test_fastq_errors_are_detected() -> None:
    good = b"@a\nACGT\n+\nIIII\n"
    assert _extract(good * 2, FASTQ, 2)[1] == 0
    assert _extract(good + b"@b\nACGT\n+\nIII\n", FASTQ, 2)[1] == ERR_QUALITY
    assert _extract(good + b"@b\nACGT\n", FASTQ, 2)[1] != 0
    assert _extract(b"a\nACGT\n+\nIIII\n", FASTQ, 2)[1] != 0


def test_count_table_and_partition_agree_with_counter() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 5000, size=100_000).astype(np.uint64)
    table = CountTable(capacity=16)  # forces many resizes
    table.add(codes[:50_000])
    table.add(codes[50_000:])
    keys, vals = table.items()
    assert dict(zip(keys.tolist(), vals.tolist(), strict=True)) == Counter(codes.tolist())
    out = np.empty_like(codes)
    counts = np.zeros(3, dtype=np.int64)
    partition(codes, codes.size, 3, out, counts)
    assert counts.sum() == codes.size and sorted(out.tolist()) == sorted(codes.tolist())
    # Each owner's slice holds whole keys: no code appears under two owners.
    owners = np.repeat(np.arange(3), counts)
    assert all(len(set(owners[out == c])) == 1 for c in np.unique(codes)[:200])


@pytest.mark.parametrize("name", ["r.fastq", "r.fastq.gz", "g.fa", "g.fa.gz"])
def test_chunks_hold_every_record_exactly_once(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.startswith("r"):
        write_reads(path, genome_length=3000, reads=60, read_length=40, seed=3)
    else:
        write_reads(path, genome_length=3000, reads=0, contig_count=9, seed=3)
    text = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    fmt = detect_format(path)
    assert fmt == (FASTQ if name.startswith("r") else FASTA)
    for chunk_bytes in (1, 7, 50, 333, 10_000):
        source = GzipSource(path) if name.endswith(".gz") else PlainSource(path)
        pieces, index = [], 0
        while (chunk := read_chunk(source, index, chunk_bytes, fmt)) is not None:
            assert text[chunk.offset : chunk.offset + len(chunk.data)] == chunk.data
            pieces.append(chunk.data)
            index += 1
        source.close()
        assert b"".join(pieces) == text, chunk_bytes


def test_fastq_quality_lines_starting_with_at_are_not_records(tmp_path: Path) -> None:
    records = [Record(f"r{i}", b"ACGTACGTAC", b"@+@@@@@@@@") for i in range(30)]
    path = write_records(tmp_path / "q.fastq", records, "fastq")
    text = path.read_bytes()
    for chunk_bytes in range(1, 60):
        source = PlainSource(path)
        chunks = []
        index = 0
        while (chunk := read_chunk(source, index, chunk_bytes, FASTQ)) is not None:
            chunks.append(chunk[1])
            index += 1
        assert b"".join(chunks) == text
        assert all(c == b"" or c.startswith(b"@r") for c in chunks), chunk_bytes


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--k", "32"], "between 1 and 31"), (["--k", "0"], "between 1 and 31"),
     (["--top", "-1"], ">= 0"), (["--chunk-bytes", "0"], "positive")],
)
def test_bad_flags_are_one_line_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse_args(["--input", "x.fa", "--k", "5", "--out", "o", *argv], quiet=False)
    assert exc.value.code == 2
    (line,) = kernel_lines(capsys.readouterr().err, "kmer")
    assert message in line, line


# --------------------------------------------------------------------------- MPI kernel


@pytest.mark.parametrize(
    ("ranks", "name", "k", "chunk"),
    [(1, "g.fa", 11, 4 << 20), (2, "r.fastq.gz", 21, 1500), (3, "g.fa.gz", 5, 700),
     (4, "r.fastq", 31, 999)],
)
def test_matches_serial_counter(
    tmp_path: Path, ranks: int, name: str, k: int, chunk: int
) -> None:
    path = tmp_path / name
    if name.startswith("r"):
        write_reads(path, genome_length=8000, reads=300, read_length=90, seed=ranks)
    else:
        write_reads(path, genome_length=15_000, reads=0, contig_count=5, seed=ranks)
    out = tmp_path / "out"
    run_ok("kmer", ranks, ["--input", str(path), "--k", str(k), "--top", "0",
                           "--chunk-bytes", str(chunk), "--out", str(out)])
    counts_tsv, hist_tsv = _expected_tsv(path, k)
    assert (out / "counts.tsv").read_text() == counts_tsv
    assert (out / "histogram.tsv").read_text() == hist_tsv
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["name"] for f in manifest["files"]] == ["counts.tsv", "histogram.tsv"]
    assert manifest["kernel"] == "kmer" and manifest["ranks"] == ranks
    assert manifest["distinct_kmers"] == counts_tsv.count("\n")
    assert manifest["input"]["gzip"] == name.endswith(".gz")
    text = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    fasta = name.startswith("g")
    records = text.count(b"\n>") + text.startswith(b">") if fasta else text.count(b"\n") // 4
    assert manifest["records"] == records


def test_top_n_is_the_head_of_the_full_ranking(tmp_path: Path) -> None:
    path = tmp_path / "r.fastq"
    write_reads(path, genome_length=5000, reads=400, read_length=60, seed=9)
    run_ok("kmer", 2, ["--input", str(path), "--k", "9", "--top", "25", "--out",
                       str(tmp_path / "out")])
    assert (tmp_path / "out" / "counts.tsv").read_text() == _expected_tsv(path, 9, 25)[0]


def test_killed_run_restarts_with_identical_counts(tmp_path: Path) -> None:
    path = tmp_path / "r.fastq.gz"
    write_reads(path, genome_length=10_000, reads=600, read_length=100, seed=1)
    ckpt = tmp_path / "ckpt"
    args = ["--input", str(path), "--k", "15", "--top", "0", "--chunk-bytes", "1000",
            "--out", str(tmp_path / "out"), "--checkpoint-dir", str(ckpt),
            "--checkpoint-every", "3"]
    # ~10 s between the awaited checkpoint and the natural end: room for a stalled test process.
    proc = start("kmer", 2, args, env_extra={"CLUSTERFLOW_STEP_DELAY_SECONDS": "0.1"})
    kill_one_rank_once(proc, lambda: newest_checkpoint_step(ckpt, "kmer") >= 15)
    resumed = newest_checkpoint_step(ckpt, "kmer")

    other = run("kmer", 3, [*args, "--restart"])
    assert other.returncode == 1
    (line,) = kernel_lines(other.stderr, "kmer")
    assert "ranks: checkpoint has 2, this run has 3" in line, line

    result = run("kmer", 2, [*args, "--restart"])
    assert result.returncode == 0, result.stderr
    assert f"restarting at round {resumed}" in result.stdout
    counts_tsv, hist_tsv = _expected_tsv(path, 15)
    assert (tmp_path / "out" / "counts.tsv").read_text() == counts_tsv
    assert (tmp_path / "out" / "histogram.tsv").read_text() == hist_tsv


def test_malformed_fastq_record_is_one_line(tmp_path: Path) -> None:
    good = [Record(f"r{i}", b"ACGTACGTAC" * 5, b"I" * 50) for i in range(200)]
    good[150] = Record("broken", b"ACGTACGTAC" * 5, b"I" * 49)
    path = write_records(tmp_path / "bad.fastq", good, "fastq")
    result = run("kmer", 2, ["--input", str(path), "--k", "5", "--chunk-bytes", "2000",
                             "--out", str(tmp_path / "out")], timeout=60)
    assert result.returncode == 1
    (line,) = kernel_lines(result.stderr, "kmer")
    assert "'broken'" in line and "quality line has 49 characters" in line, line
    assert ": rank " not in line  # agreed collectively, not an abort


def test_not_a_sequence_file_and_failing_rank(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("hello\n")
    result = run("kmer", 2, ["--input", str(path), "--k", "5", "--out", str(tmp_path / "o")],
                 timeout=60)
    assert result.returncode == 1
    (line,) = kernel_lines(result.stderr, "kmer")
    assert "neither FASTA" in line and "'h'" in line, line

    reads = write_reads(tmp_path / "r.fa", genome_length=20_000, reads=0, seed=2)
    result = run("kmer", 3, ["--input", str(reads), "--k", "5", "--chunk-bytes", "100",
                             "--out", str(tmp_path / "o")],
                 env_extra={"CLUSTERFLOW_KMER_FAIL_RANK": "1",
                            "CLUSTERFLOW_STEP_DELAY_SECONDS": "0.05"}, timeout=60)
    assert result.returncode != 0
    assert "kmer: rank 1: RuntimeError: injected failure" in result.stderr, result.stderr
