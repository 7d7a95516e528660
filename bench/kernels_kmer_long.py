"""k-mer kernel on one long FASTA record: time per base at 1x and 2x size, and the full dump's
peak memory.

Issue 13 class 8: one long record used to cost superlinear time (every chunk re-scanned the
record to find the next header; 2x size took 2.7x time, 3 ranks with a small chunk size ran
past 5 minutes) and ``--top 0`` built the whole output in one process. This prints, for a
single-record FASTA of `--bases` and twice that, and for a many-record FASTA of the same size:
the kernel's wall time (from its manifest) per Mbase. Flat time per base from 1x to 2x, and
the same for one record as for many, is the target. Then the peak RSS of the largest process
with ``--top 0`` against ``--top 100`` on the same input (``RUSAGE_CHILDREN`` of a wrapper
around mpiexec, so every rank is included).

    .venv/bin/python bench/kernels_kmer_long.py                    # 8 and 16 Mbase
    .venv/bin/python bench/kernels_kmer_long.py --bases 1000000    # smoke

Writes ``bench/results/kernels_kmer_long.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from kernels_common import REPO, machine, mpiexec, run_kernel, write_results

_RSS = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")


def _fasta(path: Path, bases: int, records: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    seq = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, bases)]
    bounds = np.linspace(0, bases, records + 1).astype(int)
    with path.open("wb") as fh:
        for i in range(records):
            fh.write(b">r%d\n" % i)
            part = seq[bounds[i] : bounds[i + 1]]
            usable = part.size - part.size % 80
            if usable:
                lines = np.hstack([part[:usable].reshape(-1, 80),
                                   np.full((usable // 80, 1), 10, dtype=np.uint8)])
                fh.write(lines.tobytes())
            if part.size > usable:
                fh.write(part[usable:].tobytes() + b"\n")
    return path


def _peak_rss_kib(ranks: int, args: list[str]) -> int:
    cmd = [*mpiexec(ranks), sys.executable, "-m", "mpi_jobs.kmer", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _RSS, *cmd], capture_output=True, text=True,
                          env=env, cwd=REPO, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", type=int, default=8_000_000)
    parser.add_argument("--k", type=int, default=21)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 16,
                        help="small on purpose: the case that used to blow up")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {
            "one record 1x": _fasta(Path(tmp) / "one1.fa", args.bases, 1, 1),
            "one record 2x": _fasta(Path(tmp) / "one2.fa", 2 * args.bases, 1, 1),
            "many records 1x": _fasta(Path(tmp) / "many1.fa", args.bases,
                                      max(1, args.bases // 5000), 1),
            "many records 2x": _fasta(Path(tmp) / "many2.fa", 2 * args.bases,
                                      max(1, 2 * args.bases // 5000), 1),
        }
        warm = ["--input", str(inputs["one record 1x"]), "--k", str(args.k), "--out",
                str(Path(tmp) / "warm")]
        run_kernel("kmer", 1, warm)  # numba cache
        for name, path in inputs.items():
            out = Path(tmp) / "out"
            kargs = ["--input", str(path), "--k", str(args.k), "--chunk-bytes",
                     str(args.chunk_bytes), "--out", str(out)]
            best = min((run_kernel("kmer", args.ranks, kargs)[1] for _ in range(args.repeat)),
                       key=lambda m: m["wall_seconds"])
            rows[name] = {
                "bases": best["bases"],
                "wall_seconds": best["wall_seconds"],
                "seconds_per_mbase": best["wall_seconds"] / best["bases"] * 1e6,
            }
        path = inputs["one record 2x"]
        memory = {
            f"top {top}": _peak_rss_kib(args.ranks, [
                "--input", str(path), "--k", str(args.k), "--top", str(top), "--out",
                str(Path(tmp) / f"mem{top}")])
            for top in (100, 0)
        }

    result = {"machine": machine(), "args": vars(args), "runs": rows,
              "peak_rss_kib": memory}
    out_path = write_results("kernels_kmer_long", result)
    print(f"k={args.k}, {args.ranks} ranks, --chunk-bytes {args.chunk_bytes}")
    for name, r in rows.items():
        print(f"{name:17s} {r['bases'] / 1e6:7.1f} Mbase  {r['wall_seconds']:7.2f} s  "
              f"{r['seconds_per_mbase'] * 1000:7.1f} ms/Mbase")
    ratio = rows["one record 2x"]["seconds_per_mbase"] / rows["one record 1x"]["seconds_per_mbase"]
    print(f"one record: time per base 2x/1x = {ratio:.2f} (1.0 = linear)")
    for name, kib in memory.items():
        print(f"peak RSS, largest process, {name:7s}: {kib / 1024:7.1f} MiB")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
