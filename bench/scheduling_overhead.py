"""Scheduling overhead per backend: submit -> running and finished -> observed.

Each job is a shell command that stamps the wall clock when it starts and right before it
exits (every rank, when a launcher starts ranks); the harness stamps the submit call and the
first status poll that reports the job terminal. So, per backend:

- submit->running: from calling ``submit`` until the first rank actually runs;
- finished->observed: from the last rank's exit stamp until ``status`` says terminal
  (the scheduler's cleanup + bookkeeping + at most one poll interval, ``--poll``);
- submit call: how long ``submit`` itself blocks.

All backends run side by side in one process, interleaved job by job so a noisy machine
hurts every backend alike; ratios (slurm / local) are printed next to the absolute numbers.

    python bench/scheduling_overhead.py --jobs 20          # needs `make slurm` first
    python bench/scheduling_overhead.py --jobs 3 --rows local,slurm   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from infra.backends.launchers import MpiexecLauncher, SrunLauncher  # noqa: E402
from infra.backends.providers.base import ExecutionProvider, JobHandle  # noqa: E402
from infra.backends.providers.local import LocalProvider  # noqa: E402
from infra.backends.providers.slurm import SlurmProvider  # noqa: E402

METRICS = ("submit_call", "submit_to_running", "finished_to_observed", "submit_to_observed")
HEADERS = {"submit_call": "submit call", "submit_to_running": "submit->running",
           "finished_to_observed": "finished->observed", "submit_to_observed": "submit->observed"}
STAMP = 'echo "start $(date +%s.%N)" >> {f}; sleep {d}; echo "end $(date +%s.%N)" >> {f}'


def rows(ranks: int) -> dict[str, tuple[Callable[[], ExecutionProvider], Any]]:
    """name -> (provider factory, launcher or None for the plain command)."""
    return {
        "local": (LocalProvider, None),
        "slurm": (SlurmProvider, None),
        "local+mpiexec": (LocalProvider, MpiexecLauncher(oversubscribe=True)),
        "slurm+srun": (SlurmProvider, SrunLauncher()),
        "slurm+mpiexec": (SlurmProvider, MpiexecLauncher(oversubscribe=False)),
    }


def one_job(provider: ExecutionProvider, launcher: Any, ranks: int, workdir: Path,
            name: str, duration: float, poll: float) -> dict[str, float]:
    stamps = workdir / f"{name}.stamps"
    shell = ["sh", "-c", STAMP.format(f=stamps, d=duration)]
    command = launcher.command(ranks, shell) if launcher else shell
    n = ranks if launcher else 1
    t0 = time.time()
    job: JobHandle = provider.submit(command, ranks=n, job_name=name, workdir=workdir)
    t_submitted = time.time()
    while True:
        status = provider.status(job)
        if status.state.terminal:
            t_observed = time.time()
            break
        time.sleep(poll)
    if status.exit_code != 0:
        raise RuntimeError(f"{name} ended {status}: {job.stderr.read_text()[-1000:]}")
    lines = [ln.split() for ln in stamps.read_text().splitlines()]
    starts = [float(t) for kind, t in lines if kind == "start"]
    ends = [float(t) for kind, t in lines if kind == "end"]
    if len(starts) != n or len(ends) != n:
        raise RuntimeError(f"{name}: expected {n} start/end stamps, got {lines}")
    return {
        "submit_call": t_submitted - t0,
        "submit_to_running": min(starts) - t0,
        "finished_to_observed": t_observed - max(ends),
        "submit_to_observed": t_observed - t0,
    }


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "min": ordered[0], "max": ordered[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=20, help="jobs per backend")
    ap.add_argument("--ranks", type=int, default=2, help="ranks for the launcher rows")
    ap.add_argument("--rows", default=",".join(rows(2)), help="comma-separated rows to run")
    ap.add_argument("--poll", type=float, default=0.02, help="status poll interval, seconds")
    ap.add_argument("--duration", type=float, default=0.2, help="job run time, seconds")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results"
                    / "scheduling_overhead.json")
    args = ap.parse_args(argv)

    table = rows(args.ranks)
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in table]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(table)}")
    providers = {name: table[name][0]() for name in chosen}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    console = Console(width=max(Console().width, 120))
    with tempfile.TemporaryDirectory(prefix="sched-bench-", dir=REPO / ".clusterflow"
                                     if (REPO / ".clusterflow").is_dir() else None) as tmp:
        workdir = Path(tmp)
        for i in range(args.jobs):
            for name in chosen:  # interleaved: noise hits every row alike
                results[name].append(one_job(
                    providers[name], table[name][1], args.ranks, workdir,
                    f"{name.replace('+', '-')}-{i}", args.duration, args.poll))
            console.print(f"\rjob {i + 1}/{args.jobs}", end="")
    console.print()

    summary = {name: {m: summarize([r[m] for r in runs]) for m in METRICS}
               for name, runs in results.items()}
    out = Table(title=f"scheduling overhead, median (p90) seconds over {args.jobs} jobs, "
                f"poll {args.poll} s")
    out.add_column("backend")
    for m in METRICS:
        out.add_column(HEADERS[m], justify="right")
    for name, s in summary.items():
        out.add_row(name, *(f"{s[m]['median']:.3f} ({s[m]['p90']:.3f})" for m in METRICS))
    console.print(out)

    ratios: dict[str, dict[str, float]] = {}
    for slurm_row, local_row in (("slurm", "local"), ("slurm+srun", "local+mpiexec"),
                                 ("slurm+mpiexec", "local+mpiexec")):
        if slurm_row in summary and local_row in summary:
            ratios[f"{slurm_row} / {local_row}"] = {
                m: summary[slurm_row][m]["median"] / summary[local_row][m]["median"]
                for m in ("submit_to_running", "finished_to_observed", "submit_to_observed")}
    for label, r in ratios.items():
        console.print(f"{label}: " + ", ".join(f"{m} x{v:.1f}" for m, v in r.items()))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "scheduling_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "parameters": {"jobs": args.jobs, "ranks": args.ranks, "poll_s": args.poll,
                       "job_duration_s": args.duration, "rows": chosen},
        "seconds": summary,
        "ratios_of_medians": ratios,
        "raw": results,
    }
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(record, indent=2) + "\n")
    tmp_out.replace(args.out)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
