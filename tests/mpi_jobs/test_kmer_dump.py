"""The full k-mer dump (``--top 0``), streamed from every rank's sorted run, and jellyfish as
an independent referee for the counts.

Issue 13 class 8 ("memory"): ``--top 0`` used to gather every k-mer on rank 0 and build the
file as one string. Now rank 0 merges per-rank sorted runs block by block
(`mpi_jobs.kmer_dump`); the file must still equal a serial Counter byte for byte and be the
same for any rank count. The input here has more distinct k-mers per rank than one merge
block, so the multi-block path of the merge runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mpi_jobs.genome import Record, random_genome, write_reads, write_records
from mpi_jobs.kmer_dump import BLOCK
from mpi_jobs.kmer_reference import count_kmers, top
from tests.kernel_launch import run_ok


def _apt_install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q",
           "--no-install-recommends", package]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # stale package lists: refresh once, try again
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"apt-get install {package} failed:\n{proc.stderr[-2000:]}"


@pytest.fixture(scope="session")
def jellyfish() -> str:
    """Debian's jellyfish 2, installed when missing (as root, as ``make slurm`` does for Slurm)."""
    exe = shutil.which("jellyfish")
    if exe is None:
        assert os.geteuid() == 0 and shutil.which("apt-get"), (
            "jellyfish is missing and installing it needs root and apt-get: run "
            "`sudo apt-get install jellyfish`")
        _apt_install("jellyfish")
        exe = shutil.which("jellyfish")
    assert exe is not None
    return exe


def _jellyfish_counts(exe: str, path: Path, k: int, tmp: Path) -> dict[str, int]:
    db = tmp / "jf.db"
    subprocess.run([exe, "count", "-m", str(k), "-C", "-s", "1M", "-t", "1", "-o", str(db),
                    str(path)], check=True, capture_output=True, timeout=300)
    dump = subprocess.run([exe, "dump", "-c", "-t", str(db)], check=True, capture_output=True,
                          text=True, timeout=300).stdout
    pairs = (line.split("\t") for line in dump.splitlines())
    return {kmer: int(count) for kmer, count in pairs}


def _tsv_counts(path: Path) -> dict[str, int]:
    pairs = (line.split("\t") for line in path.read_text().splitlines())
    return {kmer: int(count) for kmer, count in pairs}


def test_full_dump_is_the_serial_ranking_for_any_rank_count(tmp_path: Path) -> None:
    path = write_reads(tmp_path / "g.fa", genome_length=450_000, reads=0, contig_count=3,
                       seed=11)
    k = 25
    counts = count_kmers(path, k)
    assert len(counts) > 3 * BLOCK  # several merge blocks per rank on 3 ranks
    expected = "".join(f"{kmer}\t{c}\n" for kmer, c in top(counts, 0))
    for ranks in (1, 3):
        out = tmp_path / f"out{ranks}"
        run_ok("kmer", ranks, ["--input", str(path), "--k", str(k), "--top", "0",
                               "--chunk-bytes", "65536", "--out", str(out)], timeout=180)
        assert (out / "counts.tsv").read_text() == expected, ranks


def test_counts_agree_with_jellyfish(tmp_path: Path, jellyfish: str) -> None:
    # One long single-line chromosome next to short wrapped records (FASTA), and reads (FASTQ):
    # the two shapes the chunking treats differently.
    genome = random_genome(60_000, seed=21)
    fasta = write_records(tmp_path / "mix.fa",
                          [Record("chrL", genome[:50_000])],
                          "fasta", width=10**9)
    with fasta.open("ab") as fh:
        for i in range(20):
            piece = genome[50_000 + i * 500 : 50_000 + (i + 1) * 500]
            fh.write(b">c%d\n%s\n%s\n" % (i, piece[:250], piece[250:]))
    reads = write_reads(tmp_path / "r.fastq", genome_length=20_000, reads=500, read_length=100,
                        seed=22)
    for path, k, ranks in ((fasta, 21, 3), (reads, 15, 2)):
        out = tmp_path / f"out-{path.name}"
        run_ok("kmer", ranks, ["--input", str(path), "--k", str(k), "--top", "0",
                               "--chunk-bytes", "3001", "--out", str(out)])
        referee = _jellyfish_counts(jellyfish, path, k, tmp_path)
        assert len(referee) > 1000
        assert _tsv_counts(out / "counts.tsv") == referee, path.name
