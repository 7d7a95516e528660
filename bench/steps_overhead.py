"""What clusterflow's orchestration costs around the user's own jobs, side by side.

(a) one ~30 s MPI job: ``clusterflow run`` of a one-step spec on a warm local stack
    (``clusterflow local up``: Prefect server and moto already running) against a bare
    ``mpiexec`` of the same command. Goal: ratio <= 1.05. Then where the fixed seconds go:
    interpreter and import costs (fresh interpreters, interleaved; the CLI as it starts now
    and with every area's CLI imported, as it used to), the spec load, each stage of the
    run's own ``--json`` timings, the provision stage's full topology apply against its
    fingerprint check, and the rest (Prefect's flow-run creation and bookkeeping).
(b) a sweep of N one-second jobs on the local Slurm: ``clusterflow run`` (one job array,
    each point its own Prefect task run, outputs published with sha256) against a bare
    ``sbatch --array=0-(N-1)%M`` of the same command plus waiting for it. Goal: <= 1.3;
    the per-point orchestration overhead is (clusterflow - bare) / N.

Runs are interleaved (bare, clusterflow, bare, ...) so a noisy machine hurts both alike.

    python bench/steps_overhead.py                    # needs `make slurm`
    python bench/steps_overhead.py --points 8 --job-seconds 5 --repeat 1   # smoke
    python bench/steps_overhead.py --no-sweep        # (a) and its phases only, no Slurm
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


def _timed(cmd: list[str], env: dict[str, str], cwd: Path, out: list[str] | None = None,
           ) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{proc.stderr[-2000:]}")
    if out is not None:
        out.append(proc.stdout)
    return took


# What a `clusterflow run` pays before its flow starts, each measured in a fresh interpreter
# (the same cost a user's shell pays): the interpreter, the CLI as it now starts (other areas'
# commands imported on first use), the CLI as it used to start (every area's CLI imported),
# and everything the run command imports (Prefect, the pipeline), and the spec load.
_EAGER = "from flows.cli_commands import LAZY, load; [load(n) for n in LAZY]"
START_PROBES = {
    "python": "pass",
    "cli": "import flows.cli",
    "cli_all_commands": "import flows.cli; " + _EAGER,
    "run_imports": "import flows.cli, flows.prefect_runtime, prefect.settings, "
                   "flows.pipeline, flows.steps.flow",
}


def start_costs(repeat: int, spec: Path, env: dict[str, str]) -> dict[str, float]:
    """Median seconds of each start-up probe, interleaved so noise hits all alike."""
    probes = {**START_PROBES, "spec_load": "import flows.spec, time, sys; t = time.perf_counter()"
              f"; flows.spec.load_spec({str(spec)!r}); "
              "sys.stdout.write(str(time.perf_counter() - t))"}
    times: dict[str, list[float]] = {k: [] for k in probes}
    for _ in range(repeat):
        for name, code in probes.items():
            out: list[str] = []
            took = _timed([sys.executable, "-c", code], env, REPO, out)
            times[name].append(float(out[0]) if name == "spec_load" else took)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def provision_costs(repeat: int, spec: Path, home: Path) -> dict[str, Any]:
    """The provision stage's topology work on the stack's endpoint, side by side: the full
    idempotent apply every run used to make, against the fingerprint check it makes now."""
    import json as _json

    from event_bridge.topology import apply_topology
    from event_bridge.topology_cache import still_standing
    from flows.pipeline import ensure_bucket, fanout_topology
    from flows.spec import load_spec
    from infra.aws.clients import AwsTarget

    loaded = load_spec(spec)
    url = _json.loads((home / "moto.json").read_text())["url"]
    aws = AwsTarget(region=loaded.region, endpoint_url=url, embedded=True)
    topo = fanout_topology(loaded)
    ensure_bucket(aws, topo.results_bucket)
    applied = apply_topology(aws, topo)  # warm: both sides find it in place
    apply_s, check_s = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        apply_topology(aws, topo)
        apply_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        if not still_standing(aws, topo, applied):
            raise RuntimeError("the topology just applied does not pass its own check")
        check_s.append(time.perf_counter() - t0)
    return {"apply_s": round(statistics.median(apply_s), 3),
            "check_s": round(statistics.median(check_s), 3), "repeat": repeat}


def phases(start: dict[str, float], wall_s: float, stages: dict[str, float]) -> dict[str, float]:
    """Where one run's fixed seconds go; what is left after the measured parts is Prefect's
    flow-run creation, task-run bookkeeping and the interpreter's exit."""
    table = {"python start": start["python"],
             "CLI imports": round(start["cli"] - start["python"], 3),
             "run imports (Prefect, pipeline)": round(start["run_imports"] - start["cli"], 3),
             "spec load": start["spec_load"]}
    table.update({f"stage: {k}": v for k, v in stages.items()})
    table["flow-run creation and the rest"] = round(wall_s - sum(table.values()), 3)
    return table


def single_job(samples: int, repeat: int, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """(a): the same pi.py run bare and through clusterflow on a warm local stack."""
    argv = [sys.executable, str(PI), "--samples", str(samples), "--out",
            str(work / "bare" / "estimate.json")]
    bare_cmd = MpiexecLauncher(oversubscribe=True).command(2, argv)
    spec = _spec(work / "one.yaml", [{
        "name": "pi", "command": ["python", str(PI), "--samples", str(samples), "--out",
                                  "{out}/estimate.json"]}])
    run_cmd = [str(BIN / "clusterflow"), "run", "--spec", str(spec), "--json"]
    bare, flow, outs = [], [], []
    for _ in range(repeat):
        bare.append(_timed(bare_cmd, env, work))
        flow.append(_timed(run_cmd, env, work, outs))
    b, f = statistics.median(bare), statistics.median(flow)
    runs = [json.loads(o.strip().splitlines()[-1])["seconds"] for o in outs]
    start = start_costs(max(3, repeat), spec, env)
    topology = provision_costs(max(5, repeat), spec, Path(env["CLUSTERFLOW_HOME"]))
    # The median run's own stage times; the job itself is the bare run's share of "steps".
    mid = flow.index(sorted(flow)[len(flow) // 2])
    stages = dict(runs[mid])
    if "steps" in stages:
        stages["steps (orchestration around the job)"] = round(stages.pop("steps") - b, 3)
    return {"bare_s": bare, "clusterflow_s": flow, "ratio": round(f / b, 3),
            "fixed_overhead_s": round(f - b, 2),
            "stage_seconds": runs, "start_s": start, "provision_topology": topology,
            "phases_s": phases(start, flow[mid] - b, stages)}


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
    ap.add_argument("--no-sweep", action="store_true",
                    help="only the single job and its phases (no Slurm needed)")
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
        # The runs happen in a scratch dir: point them at the stack's state, or each would
        # start a private moto server (and find a cold endpoint) instead of the warm one.
        env["CLUSTERFLOW_HOME"] = str(REPO / ".clusterflow")
        try:
            one = single_job(args.samples, args.repeat, work, env)
            many = None if args.no_sweep else sweep(
                args.points, args.job_seconds, args.max_parallel, args.repeat, work, env)
        finally:
            subprocess.run([str(BIN / "clusterflow"), "local", "down"], env=env, cwd=REPO,
                           capture_output=True)
    table = Table("measure", "bare", "clusterflow", "ratio", "goal", box=None)
    table.add_row("one ~30 s job, warm stack (median s)",
                  f"{statistics.median(one['bare_s']):.1f}",
                  f"{statistics.median(one['clusterflow_s']):.1f}", f"{one['ratio']:.3f}",
                  "<= 1.05")
    if many:
        table.add_row(f"{args.points}-point sweep of {args.job_seconds:g} s jobs on Slurm "
                      "(median s)", f"{statistics.median(many['bare_s']):.1f}",
                      f"{statistics.median(many['clusterflow_s']):.1f}",
                      f"{many['ratio']:.3f}", "<= 1.3")
    console.print(table)
    console.print(f"fixed overhead per run: {one['fixed_overhead_s']} s"
                  + (f"; orchestration per sweep point: {many['overhead_per_point_ms']} ms"
                     if many else ""))
    fixed = Table("where the fixed seconds of one run go", "seconds", box=None)
    for phase, secs in one["phases_s"].items():
        fixed.add_row(phase, f"{secs:.3f}")
    fixed.add_row("[bold]total (clusterflow - bare)[/]",
                  f"{sum(one['phases_s'].values()):.3f}")
    console.print(fixed)
    console.print(f"CLI start: {one['start_s']['cli']:.3f} s now, "
                  f"{one['start_s']['cli_all_commands']:.3f} s with every area's CLI imported")
    topo = one["provision_topology"]
    console.print(f"provision, fan-out topology: full apply {topo['apply_s']:.3f} s, "
                  f"fingerprint check {topo['check_s']:.3f} s (median of {topo['repeat']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "cpus": os.cpu_count(), "single_job": one,
                                    "sweep": many}, indent=2) + "\n")


if __name__ == "__main__":
    main()
