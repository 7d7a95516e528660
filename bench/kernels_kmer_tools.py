"""k-mer kernel against KMC 3 and jellyfish 2.3 (and a serial ``Counter``), side by side.

Issue 17: "faster than the fastest counter". One seeded read set (`mpi_jobs.genome`, 150 bp
FASTQ reads), canonical k-mers, and in each of ``--rounds`` rounds, in turn:

* ``kmc -t2`` (KMC 3: counting into its database, ``-ci1`` so singletons are kept and
  ``-cs`` high so no count is capped) and ``jellyfish count -t 2 -C``;
* ``mpiexec -n R python -m mpi_jobs.kmer`` for R = 1, 2, timed from the launcher: mpiexec,
  interpreter start-up, imports and loading numba's cached machine code are part of what a user
  waits for, so they are part of the time (the first, cold-cache run is reported separately);
* once per run (it is slow): ``collections.Counter`` (`mpi_jobs.kmer_reference`).

Every tool's peak RSS comes from ``/usr/bin/time -f %M``; for the kernel it is the *sum* over
ranks. Counts must agree, not only times: the full histogram (``count -> distinct k-mers``) of
KMC (``kmc_tools transform histogram``), jellyfish (``jellyfish histo``) and the kernel are
compared, and the kernel's top ``--top`` list is compared with KMC's and jellyfish's dumps of
the k-mers at or above the list's smallest count (sorted the same way).

The kernel's time is also broken down (``kmer_breakdown``: the median over rounds of the
manifest's ``phase_seconds``, slowest rank per phase, from ``startup`` (process start to the
kernel: interpreter, imports, ``MPI_Init``) and ``jit`` (loading numba's cached code) to
``output``; and each rank's CPU seconds, which on a shared machine say what the wall times
cannot). The load average is recorded per round.

KMC and jellyfish come from Debian (``kmc``, ``jellyfish``); when they are missing and this
runs as root they are installed with apt-get, otherwise the script says what to install.

    .venv/bin/python bench/kernels_kmer_tools.py                    # 90 Mbase, k = 21
    .venv/bin/python bench/kernels_kmer_tools.py --reads 100000     # 15 Mbase (loaded machine)

Writes ``bench/results/kernels_kmer_tools.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kernels_common import REPO, machine, mpiexec, write_results

from mpi_jobs.genome import write_reads
from mpi_jobs.kmer_reference import count_kmers

HIST_MAX = 1_000_000  # histogram range asked of KMC and jellyfish (both allocate per bin)
TOOLS = {"kmc": "kmc", "kmc_tools": "kmc", "jellyfish": "jellyfish"}


def ensure_tools() -> None:
    missing = sorted({pkg for exe, pkg in TOOLS.items() if shutil.which(exe) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"kernels_kmer_tools: missing {', '.join(missing)}; install the Debian "
                         f"package(s): apt-get install {' '.join(missing)}")
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True,
                   stdout=subprocess.DEVNULL)


def timed(cmd: list[str], rss_file: Path, env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run `cmd` under /usr/bin/time; (wall seconds, peak RSS in KiB)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *cmd],
                          capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, int(rss_file.read_text().split()[-1])


def read_pairs(path: Path) -> list[tuple[str, int]]:
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip():
            a, b = line.split()
            pairs.append((a, int(b)))
    return pairs


def top_of(pairs: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    return sorted(pairs, key=lambda p: (-p[1], p[0]))[:n]


def run_kmc(reads: Path, k: int, work: Path) -> dict[str, Any]:
    db, tmp = work / "kmc_db", work / "kmc_tmp"
    tmp.mkdir(exist_ok=True)
    wall, rss = timed(["kmc", f"-k{k}", "-t2", "-ci1", "-cs4294967295", "-hp", "-fq",
                       str(reads), str(db), str(tmp)], work / "kmc.rss")
    return {"wall_seconds": wall, "peak_rss_kib": rss, "db": db}


def kmc_results(db: Path, min_count: int, work: Path) -> tuple[dict[int, int], list]:
    hist, dump = work / "kmc.histo", work / "kmc.dump"
    subprocess.run(["kmc_tools", "-hp", "transform", str(db), "histogram", str(hist),
                    f"-cx{HIST_MAX}"], check=True, capture_output=True)
    subprocess.run(["kmc_tools", "-hp", "transform", str(db), f"-ci{min_count}", "dump",
                    str(dump)], check=True, capture_output=True)
    histogram = {c: n for c, n in ((int(a), int(b)) for a, b in
                                   (line.split() for line in hist.read_text().splitlines()))
                 if n}
    return histogram, read_pairs(dump)


def run_jellyfish(reads: Path, k: int, work: Path, size_hint: int) -> dict[str, Any]:
    db = work / "mer_counts.jf"
    wall, rss = timed(["jellyfish", "count", "-m", str(k), "-s", str(size_hint), "-t", "2",
                       "-C", "-o", str(db), str(reads)], work / "jf.rss")
    return {"wall_seconds": wall, "peak_rss_kib": rss, "db": db}


def jellyfish_results(db: Path, min_count: int) -> tuple[dict[int, int], list]:
    histo = subprocess.run(["jellyfish", "histo", "-h", str(HIST_MAX), str(db)], check=True,
                           capture_output=True, text=True).stdout
    dump = subprocess.run(["jellyfish", "dump", "-c", "-L", str(min_count), str(db)],
                          check=True, capture_output=True, text=True).stdout
    histogram = {int(a): int(b) for a, b in (line.split() for line in histo.splitlines())
                 if int(b)}
    pairs = [(a, int(b)) for a, b in (line.split() for line in dump.splitlines())]
    return histogram, pairs


def run_kernel_timed(reads: Path, k: int, top: int, ranks: int, work: Path) -> dict[str, Any]:
    out = work / f"kmer{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    rss = work / f"rss{ranks}"
    shutil.rmtree(rss, ignore_errors=True)
    rss.mkdir()
    inner = (f'exec /usr/bin/time -f %M -o "{rss}/rank.$OMPI_COMM_WORLD_RANK" '
             f"{sys.executable} -m mpi_jobs.kmer --input {reads} --k {k} --top {top} "
             f"--out {out}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run([*mpiexec(ranks), "sh", "-c", inner], capture_output=True, text=True,
                          env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"kmer on {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_seconds": wall, "kernel_wall_seconds": manifest["wall_seconds"],
            "peak_rss_kib": sum(int(p.read_text().split()[-1]) for p in rss.iterdir()),
            "out": out, "phases": manifest.get("phase_seconds"),
            "rank_cpu_seconds": manifest.get("rank_cpu_seconds")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genome-length", type=int, default=5_000_000)
    parser.add_argument("--reads", type=int, default=600_000, help="600k x 150 bp = 90 Mbase")
    parser.add_argument("--read-length", type=int, default=150)
    parser.add_argument("--k", type=int, default=21)
    parser.add_argument("--top", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-counter", action="store_true", help="skip the serial Counter")
    args = parser.parse_args()
    ensure_tools()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reads = work / "reads.fastq"
        write_reads(reads, genome_length=args.genome_length, reads=args.reads,
                    read_length=args.read_length, seed=7)
        size = reads.stat().st_size
        bases = args.reads * args.read_length
        size_hint = 2 * args.genome_length + bases // 10

        # The kernel's first run after a source change compiles (numba, cache=True); later
        # runs load the cached code. Both are reported; the rounds use the warm cache.
        first = run_kernel_timed(reads, args.k, args.top, 1, work)
        rows: dict[str, list[dict[str, Any]]] = {"kmc_2_threads": [], "jellyfish_2_threads": [],
                                                 "kmer_1_rank": [], "kmer_2_ranks": []}
        last: dict[str, Any] = {}
        for _ in range(args.rounds):
            last["kmc_2_threads"] = run_kmc(reads, args.k, work)
            last["jellyfish_2_threads"] = run_jellyfish(reads, args.k, work, size_hint)
            last["kmer_1_rank"] = run_kernel_timed(reads, args.k, args.top, 1, work)
            last["kmer_2_ranks"] = run_kernel_timed(reads, args.k, args.top, 2, work)
            for name, r in last.items():
                rows[name].append({"wall_seconds": r["wall_seconds"],
                                   "peak_rss_kib": r["peak_rss_kib"],
                                   "loadavg": os.getloadavg()[0],
                                   **({"kernel_wall_seconds": r["kernel_wall_seconds"],
                                       "phase_seconds": r["phases"],
                                       "rank_cpu_seconds": r["rank_cpu_seconds"]}
                                      if "kernel_wall_seconds" in r else {})})
        t_counter = None
        if not args.no_counter:
            t0 = time.perf_counter()
            count_kmers(reads, args.k)
            t_counter = time.perf_counter() - t0

        # Agreement: full histograms and the top list.
        ours_hist = {int(a): int(b) for a, b in (line.split() for line in (
            last["kmer_2_ranks"]["out"] / "histogram.tsv").read_text().splitlines())}
        ours_top = read_pairs(last["kmer_2_ranks"]["out"] / "counts.tsv")
        ours_top_1 = read_pairs(last["kmer_1_rank"]["out"] / "counts.tsv")
        floor = min(c for _, c in ours_top)
        kmc_hist, kmc_dump = kmc_results(last["kmc_2_threads"]["db"], floor, work)
        jf_hist, jf_dump = jellyfish_results(last["jellyfish_2_threads"]["db"], floor)
        agreement = {
            "histogram_equals_kmc": ours_hist == kmc_hist,
            "histogram_equals_jellyfish": ours_hist == jf_hist,
            "top_equals_kmc": ours_top == top_of(kmc_dump, args.top),
            "top_equals_jellyfish": ours_top == top_of(jf_dump, args.top),
            "top_1_rank_equals_2_ranks": ours_top_1 == ours_top,
            "distinct_kmers": {"kmer": sum(ours_hist.values()), "kmc": sum(kmc_hist.values()),
                               "jellyfish": sum(jf_hist.values())},
        }

    def summary(name: str) -> dict[str, Any]:
        walls = [r["wall_seconds"] for r in rows[name]]
        return {"wall_seconds_min": min(walls), "wall_seconds_median": statistics.median(walls),
                "wall_seconds_max": max(walls),
                "peak_rss_mib": max(r["peak_rss_kib"] for r in rows[name]) / 1024,
                "runs": rows[name]}

    tools = {name: summary(name) for name in rows}
    # Where the kernel's time goes (issue 17: profile first): the median over rounds of each
    # phase's seconds (slowest rank), from start-up to output, and the ranks' CPU seconds.
    breakdown = {}
    for name in ("kmer_1_rank", "kmer_2_ranks"):
        runs = rows[name]
        phases = {key: statistics.median(r["phase_seconds"][key] for r in runs)
                  for key in runs[0]["phase_seconds"]}
        breakdown[name] = {
            "launcher_wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
            "kernel_wall_seconds": statistics.median(r["kernel_wall_seconds"] for r in runs),
            "phase_seconds": phases,
            "rank_cpu_seconds": [statistics.median(r["rank_cpu_seconds"][i] for r in runs)
                                 for i in range(len(runs[0]["rank_cpu_seconds"]))],
        }
    # Ratios per round (side by side), then their spread.
    per_round = [{"kmer_2_over_kmc": rows["kmer_2_ranks"][i]["wall_seconds"]
                  / rows["kmc_2_threads"][i]["wall_seconds"],
                  "kmer_1_over_kmc": rows["kmer_1_rank"][i]["wall_seconds"]
                  / rows["kmc_2_threads"][i]["wall_seconds"],
                  "kmer_2_over_jellyfish": rows["kmer_2_ranks"][i]["wall_seconds"]
                  / rows["jellyfish_2_threads"][i]["wall_seconds"]}
                 for i in range(args.rounds)]
    ratios: dict[str, Any] = {key: {"min": min(r[key] for r in per_round),
                                    "median": statistics.median(r[key] for r in per_round),
                                    "max": max(r[key] for r in per_round)}
                              for key in per_round[0]}
    ratios["kmer_2_rss_over_kmc_rss"] = (tools["kmer_2_ranks"]["peak_rss_mib"]
                                         / tools["kmc_2_threads"]["peak_rss_mib"])
    if t_counter is not None:
        for name, ranks in (("kmer_1_rank", 1), ("kmer_2_ranks", 2)):
            ratios[f"counter_over_{name}_per_rank_incl_launch"] = (
                t_counter / (tools[name]["wall_seconds_min"] * ranks))
            ratios[f"counter_over_{name}_incl_launch"] = t_counter / tools[name]["wall_seconds_min"]
    result = {"machine": machine(), "args": vars(args), "input_bytes": size, "bases": bases,
              "first_run_cold_cache_wall_seconds": first["wall_seconds"],
              "counter_seconds": t_counter, "tools": tools, "per_round": per_round,
              "kmer_breakdown": breakdown, "loadavg_at_end": os.getloadavg(),
              "ratios": ratios, "agreement": agreement,
              "targets": {"kmer_2_ranks_at_most_0.8_of_kmc":
                          ratios["kmer_2_over_kmc"]["median"] <= 0.8,
                          "kmer_rss_at_most_kmc": ratios["kmer_2_rss_over_kmc_rss"] <= 1.0}}
    path = write_results("kernels_kmer_tools", result)
    print(f"{bases / 1e6:.0f} Mbase of {args.read_length} bp reads ({size / 1e6:.0f} MB FASTQ), "
          f"k = {args.k}, canonical; {args.rounds} rounds; load at start "
          f"{result['machine']['loadavg_at_start']}")
    print(f"kmer first run (cold numba cache), 1 rank: {first['wall_seconds']:.2f} s")
    for name, t in tools.items():
        print(f"{name:22s} wall min {t['wall_seconds_min']:6.2f} median "
              f"{t['wall_seconds_median']:6.2f} max {t['wall_seconds_max']:6.2f} s  "
              f"peak RSS {t['peak_rss_mib']:7.1f} MiB")
    if t_counter is not None:
        print(f"serial Counter          {t_counter:.2f} s")
    for name, b in breakdown.items():
        print(f"{name} breakdown (median s, slowest rank): launcher "
              f"{b['launcher_wall_seconds']:.2f}, kernel {b['kernel_wall_seconds']:.2f}; "
              + ", ".join(f"{k} {v:.2f}" for k, v in b["phase_seconds"].items())
              + "; rank CPU " + ", ".join(f"{c:.2f}" for c in b["rank_cpu_seconds"]))
    print("load average per round:", [round(r["loadavg"], 1) for r in rows["kmc_2_threads"]],
          "at end", result["loadavg_at_end"])
    for key, value in ratios.items():
        print(f"{key:48s} " + (f"min {value['min']:.2f} median {value['median']:.2f} max "
                               f"{value['max']:.2f}" if isinstance(value, dict)
                               else f"{value:.2f}"))
    print("agreement:", agreement)
    print("targets:", result["targets"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
