"""What clusterflow's orchestration costs around the user's own jobs, side by side.

(a) one ~30 s MPI job: ``clusterflow run`` of a one-step spec on a warm local stack
    (``clusterflow local up``: Prefect server and moto already running) against a bare
    ``mpiexec`` of the same command. Goal: ratio <= 1.05.
(b) a sweep of N one-second jobs on the local Slurm: ``clusterflow run`` (one job array,
    each point its own Prefect task run, outputs published with sha256) against a bare
    ``sbatch --array=0-(N-1)%M`` of the same command plus waiting for it. Goal: <= 1.3;
    the per-point orchestration overhead is (clusterflow - bare) / N.

Runs are interleaved (bare, clusterflow, bare, ...) so a noisy machine hurts both alike.

    python bench/steps_overhead.py                    # needs `make slurm`
    python bench/steps_overhead.py --points 8 --job-seconds 5 --repeat 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from infra.backends.launchers import MpiexecLauncher  # noqa: E402
from infra.clusters.slurm_local import default_state_dir, slurm_env  # noqa: E402

BIN = Path(sys.executable).parent
PI = REPO / "examples" / "mpi4py-montecarlo" / "pi.py"
SLEEPER = ["python", "-c", "import sys, time; time.sleep(float(sys.argv[1]))"]


def _spec(path: Path, steps: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "bench-steps", "ranks": 2, "steps": steps,
        "storage": {"input_bucket": "bench-steps-in", "results_bucket": "bench-steps-out"}}))
    return path


def _timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{proc.stderr[-2000:]}")
    return took


def single_job(samples: int, repeat: int, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """(a): the same pi.py run bare and through clusterflow on a warm local stack."""
    argv = [sys.executable, str(PI), "--samples", str(samples), "--out",
            str(work / "bare" / "estimate.json")]
    bare_cmd = MpiexecLauncher(oversubscribe=True).command(2, argv)
    spec = _spec(work / "one.yaml", [{
        "name": "pi", "command": ["python", str(PI), "--samples", str(samples), "--out",
                                  "{out}/estimate.json"]}])
    run_cmd = [str(BIN / "clusterflow"), "run", "--spec", str(spec), "--json"]
    bare, flow = [], []
    for _ in range(repeat):
        bare.append(_timed(bare_cmd, env, work))
        flow.append(_timed(run_cmd, env, work))
    b, f = statistics.median(bare), statistics.median(flow)
    return {"bare_s": bare, "clusterflow_s": flow, "ratio": round(f / b, 3),
            "fixed_overhead_s": round(f - b, 2)}


def sweep(points: int, job_seconds: float, max_parallel: int, repeat: int, work: Path,
          env: dict[str, str]) -> dict[str, Any]:
    """(b): N one-second jobs as a bare job array and as a clusterflow sweep on Slurm."""
    script = work / "bare.sbatch"
    script.write_text("#!/bin/bash\nexec " + " ".join(SLEEPER[:2]) + " "
                      + json.dumps(SLEEPER[2]) + f" {job_seconds}\n")
    sbatch = ["sbatch", "--parsable", "--wait", f"--array=0-{points - 1}%{max_parallel}",
              "--ntasks=1", f"--output={work}/bare-%a.out", str(script)]
    spec = _spec(work / "sweep.yaml", [{
        "name": "sleep", "backend": "slurm", "launcher": "none", "ranks": 1,
        "command": [*SLEEPER, "{params.seconds}"], "parameters": {"seconds": job_seconds},
        "sweep": {"i": {"range": [0, points]}, "max_parallel": max_parallel}}])
    run_cmd = [str(BIN / "clusterflow"), "run", "--spec", str(spec), "--json"]
    bare, flow = [], []
    for _ in range(repeat):
        bare.append(_timed(sbatch, env, work))
        flow.append(_timed(run_cmd, env, work))
    b, f = statistics.median(bare), statistics.median(flow)
    return {"points": points, "job_seconds": job_seconds, "max_parallel": max_parallel,
            "bare_s": bare, "clusterflow_s": flow, "ratio": round(f / b, 3),
            "overhead_per_point_ms": round(1000 * (f - b) / points, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=60_000_000, help="pi.py samples (~30 s)")
    ap.add_argument("--points", type=int, default=64)
    ap.add_argument("--job-seconds", type=float, default=1.0)
    ap.add_argument("--max-parallel", type=int, default=2, help="the local Slurm has 2 CPUs")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "steps.json")
    args = ap.parse_args()
    env = {**os.environ, **slurm_env(default_state_dir())}
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench-steps-") as tmp:
        work = Path(tmp)
        up = subprocess.run([str(BIN / "clusterflow"), "local", "up"], env=env, cwd=REPO,
                            capture_output=True, text=True)
        if up.returncode != 0:
            raise SystemExit(f"clusterflow local up failed:\n{up.stderr[-2000:]}")
        from flows.local_stack import recorded_prefect_api

        api = recorded_prefect_api(REPO / ".clusterflow")
        if not api:
            raise SystemExit("the local stack's Prefect server does not answer")
        env["PREFECT_API_URL"] = api
        try:
            one = single_job(args.samples, args.repeat, work, env)
            many = sweep(args.points, args.job_seconds, args.max_parallel, args.repeat, work,
                         env)
        finally:
            subprocess.run([str(BIN / "clusterflow"), "local", "down"], env=env, cwd=REPO,
                           capture_output=True)
    table = Table("measure", "bare", "clusterflow", "ratio", "goal", box=None)
    table.add_row("one ~30 s job, warm stack (median s)",
                  f"{statistics.median(one['bare_s']):.1f}",
                  f"{statistics.median(one['clusterflow_s']):.1f}", f"{one['ratio']:.3f}",
                  "<= 1.05")
    table.add_row(f"{args.points}-point sweep of {args.job_seconds:g} s jobs on Slurm "
                  "(median s)", f"{statistics.median(many['bare_s']):.1f}",
                  f"{statistics.median(many['clusterflow_s']):.1f}", f"{many['ratio']:.3f}",
                  "<= 1.3")
    console.print(table)
    console.print(f"fixed overhead per run: {one['fixed_overhead_s']} s; "
                  f"orchestration per sweep point: {many['overhead_per_point_ms']} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "cpus": os.cpu_count(), "single_job": one,
                                    "sweep": many}, indent=2) + "\n")


if __name__ == "__main__":
    main()
