"""Seeded synthetic genomes and sequencing reads, for the k-mer kernel's tests and benchmarks.

The same arguments always produce the same bytes (numpy ``default_rng(seed)``), so an input can
be regenerated instead of shipped. The genome is not uniform noise: it carries interspersed
repeat families (so the k-mer histogram has a repeat peak next to the unique one), soft-masked
(lower-case) repeat copies and runs of ``N`` (assembly gaps), which exercise the kernel's
upper-casing and its skipping of k-mers with non-ACGT characters. Reads are sampled from both
strands with substitution errors, as FASTQ (4-line records) or FASTA.

Command line::

    python -m mpi_jobs.genome --out reads.fastq.gz --genome-length 1000000 --reads 50000
    python -m mpi_jobs.genome --out genome.fa --genome-length 1000000 --reads 0

A ``.gz`` suffix writes gzip. ``--reads 0`` writes the genome itself (as ``--contigs`` FASTA
records).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from mpi_jobs.manifest import atomic_write

_BASES = np.frombuffer(b"ACGT", dtype=np.uint8)
_COMPLEMENT = bytes.maketrans(b"ACGTNacgtn", b"TGCANtgcan")


@dataclass(frozen=True)
class Record:
    name: str
    sequence: bytes
    quality: bytes | None = None  # None: a FASTA record


def reverse_complement(seq: bytes) -> bytes:
    return seq.translate(_COMPLEMENT)[::-1]


def random_genome(
    length: int,
    seed: int = 0,
    *,
    gc: float = 0.42,
    repeat_families: int = 4,
    repeat_length: int = 300,
    repeat_copies: int = 12,
    gaps: int = 3,
) -> bytes:
    """A genome of `length` bases: random background with repeats, soft-masking and N gaps."""
    if length <= 0:
        raise ValueError(f"genome length must be positive, got {length}")
    if not 0 < gc < 1:
        raise ValueError(f"gc must be in (0, 1), got {gc}")
    rng = np.random.default_rng(seed)
    at, cg = (1 - gc) / 2, gc / 2
    genome = _BASES[rng.choice(4, size=length, p=[at, cg, cg, at])]
    for _ in range(repeat_families if length > 4 * repeat_length else 0):
        family = _BASES[rng.integers(0, 4, repeat_length)]
        for _ in range(repeat_copies):
            copy = family.copy()
            mutated = rng.random(repeat_length) < 0.02  # diverged copies, like real repeats
            copy[mutated] = _BASES[rng.integers(0, 4, int(mutated.sum()))]
            if rng.random() < 0.5:
                copy = np.frombuffer(reverse_complement(copy.tobytes()), dtype=np.uint8)
            start = int(rng.integers(0, length - repeat_length))
            if rng.random() < 0.3:  # soft-masked copy: lower case, as repeat maskers write it
                copy = copy | 0x20
            genome[start : start + repeat_length] = copy
    for _ in range(gaps if length > 1000 else 0):
        start = int(rng.integers(0, length - 100))
        genome[start : start + int(rng.integers(10, 100))] = ord("N")
    return genome.tobytes()


def simulate_reads(
    genome: bytes,
    count: int,
    read_length: int,
    seed: int = 0,
    *,
    error_rate: float = 0.005,
) -> Iterator[Record]:
    """`count` reads sampled uniformly from both strands, with substitution errors."""
    if read_length <= 0 or read_length > len(genome):
        raise ValueError(f"read length must be in 1..{len(genome)}, got {read_length}")
    if count < 0:
        raise ValueError(f"read count must be >= 0, got {count}")
    rng = np.random.default_rng(seed + 1)
    starts = rng.integers(0, len(genome) - read_length + 1, size=count)
    strands = rng.random(count) < 0.5
    view = np.frombuffer(genome, dtype=np.uint8)
    for i in range(count):
        read = view[starts[i] : starts[i] + read_length].copy()
        errors = np.flatnonzero(rng.random(read_length) < error_rate)
        read[errors] = _BASES[rng.integers(0, 4, errors.size)]
        seq = read.tobytes().upper()
        if strands[i]:
            seq = reverse_complement(seq)
        quality = (rng.integers(20, 41, read_length) + 33).astype(np.uint8)
        quality[errors if not strands[i] else read_length - 1 - errors] = 33 + 8
        yield Record(f"read{i} pos={int(starts[i])} strand={'-' if strands[i] else '+'}", seq,
                     quality.tobytes())


def contigs(genome: bytes, pieces: int) -> Iterator[Record]:
    """The genome cut into `pieces` FASTA records."""
    pieces = max(1, min(pieces, len(genome)))
    bounds = np.linspace(0, len(genome), pieces + 1).astype(int)
    for i in range(pieces):
        yield Record(f"contig{i + 1} length={bounds[i + 1] - bounds[i]}",
                     genome[bounds[i] : bounds[i + 1]])


def _write_records(fh: IO[bytes], records: Iterable[Record], fmt: str, width: int) -> None:
    for rec in records:
        if fmt == "fastq":
            quality = rec.quality if rec.quality is not None else b"I" * len(rec.sequence)
            fh.write(b"@%s\n%s\n+\n%s\n" % (rec.name.encode(), rec.sequence, quality))
        else:
            fh.write(b">%s\n" % rec.name.encode())
            seq = rec.sequence
            for i in range(0, len(seq), width):
                fh.write(seq[i : i + width] + b"\n")


def write_records(
    path: str | os.PathLike[str],
    records: Iterable[Record],
    fmt: str,
    *,
    width: int = 60,
    compress: bool | None = None,
) -> Path:
    """Write FASTA (`width` bases per line) or FASTQ, atomically; gzip if `compress`
    (default: if `path` ends in ``.gz``)."""
    if fmt not in ("fasta", "fastq"):
        raise ValueError(f"format must be 'fasta' or 'fastq', got {fmt!r}")
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"

    def write(fh: IO[bytes]) -> None:
        if compress:
            # mtime=0: the same records give the same compressed bytes (and sha256).
            with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=6, mtime=0) as gz:
                _write_records(gz, records, fmt, width)  # type: ignore[arg-type]
        else:
            _write_records(fh, records, fmt, width)

    return atomic_write(path, write)


def write_reads(
    path: str | os.PathLike[str],
    *,
    genome_length: int,
    reads: int,
    read_length: int = 150,
    seed: int = 0,
    fmt: str | None = None,
    error_rate: float = 0.005,
    contig_count: int = 8,
    compress: bool | None = None,
) -> Path:
    """Generate a genome and write its reads (or, with ``reads=0``, its contigs) to `path`.

    `fmt` defaults from the file name (``.fa``/``.fasta`` → FASTA, else FASTQ; ``.gz`` ignored);
    `compress` (gzip) defaults to whether the name ends in ``.gz``.
    """
    path = Path(path)
    if fmt is None:
        stem = path.name.removesuffix(".gz")
        fmt = "fasta" if stem.endswith((".fa", ".fasta", ".fna")) else "fastq"
    genome = random_genome(genome_length, seed)
    if reads == 0:
        return write_records(path, contigs(genome, contig_count), fmt, compress=compress)
    return write_records(
        path, simulate_reads(genome, reads, read_length, seed, error_rate=error_rate), fmt,
        compress=compress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpi_jobs.genome",
        description="Write a seeded synthetic genome's reads (FASTQ/FASTA, optionally gzip).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output file (.gz: gzip)")
    parser.add_argument("--genome-length", type=int, default=1_000_000)
    parser.add_argument("--reads", type=int, default=10_000, help="0: write the genome itself")
    parser.add_argument("--read-length", type=int, default=150)
    parser.add_argument("--error-rate", type=float, default=0.005)
    parser.add_argument("--contigs", type=int, default=8, help="FASTA records with --reads 0")
    parser.add_argument("--format", choices=("fasta", "fastq"), help="default: from --out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = write_reads(args.out, genome_length=args.genome_length, reads=args.reads,
                           read_length=args.read_length, seed=args.seed, fmt=args.format,
                           error_rate=args.error_rate, contig_count=args.contigs)
    except (ValueError, OSError) as exc:
        print(f"genome: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
