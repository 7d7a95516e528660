"""Serial k-mer counting with ``collections.Counter``: the kernel's reference and baseline.

Written the obvious way (strings, a dict) and independently of the compiled kernel, so
agreement between the two means something; `bench/kernels_kmer.py` uses it as the serial
baseline the MPI kernel is compared with.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

_COMPLEMENT = str.maketrans("ACGT", "TGCA")
_NOT_ACGT = re.compile(r"[^ACGT]+")


def _open(path: Path):  # type: ignore[no-untyped-def]
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt") if gz else open(path)


def sequences(path: Path) -> Iterator[str]:
    """Upper-cased sequences of a FASTA or 4-line FASTQ file (plain or gzip)."""
    with _open(path) as fh:
        text = fh.read()
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if first.startswith(">"):
        seq: list[str] = []
        started = False
        for line in lines:
            if line.startswith(">"):
                if started:
                    yield "".join(seq).upper()
                seq, started = [], True
            elif started:
                seq.append(line)
        if started:
            yield "".join(seq).upper()
    else:
        lines = [ln for ln in lines if ln.strip()]
        for i in range(1, len(lines), 4):
            yield lines[i].upper()


def count_kmers(path: Path, k: int) -> Counter[str]:
    """Canonical k-mer counts (k-mers with any non-ACGT character are skipped)."""
    counts: Counter[str] = Counter()
    for seq in sequences(path):
        for run in _NOT_ACGT.split(seq):
            for i in range(len(run) - k + 1):
                kmer = run[i : i + k]
                rc = kmer.translate(_COMPLEMENT)[::-1]
                counts[min(kmer, rc)] += 1
    return counts


def top(counts: Counter[str], n: int) -> list[tuple[str, int]]:
    """The `n` most frequent (all when n == 0), by count descending then k-mer."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranked if n == 0 else ranked[:n]


def histogram(counts: Counter[str]) -> list[tuple[int, int]]:
    """(count, number of distinct k-mers with that count), by count ascending."""
    return sorted(Counter(counts.values()).items())
