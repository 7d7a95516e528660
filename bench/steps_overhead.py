"""What clusterflow's orchestration costs around the user's own jobs, side by side.

(a) one ~25 s MPI job: ``clusterflow run`` of a one-step spec on a warm local stack
    (``clusterflow local up``: Prefect server, moto and the warm runner already running)
    against a bare ``mpiexec`` of the same command, interleaved, with the load average, both
    ways a run can go: through the stack's warm runner (``flows.warm_runner``: the default
    when the stack runs) and in-process (``CLUSTERFLOW_NO_WARM_RUNNER=1``: Prefect imported
    by the run itself). Goal: ratio <= 1.05 (fixed <= 1 s). Where the fixed seconds go comes
    from the runs themselves: each
    ``clusterflow run`` writes a mark as each phase ends (``CLUSTERFLOW_PHASE_FILE``,
    ``flows/phase_clock.py``: CLI imports, spec load, preflight, Prefect and pipeline imports,
    flow-run creation, the stages, artifacts, flow-run teardown, output, process exit), so
    the phases add up to the run's wall time. Next to it, Prefect's own floor: an empty flow
    and one with four no-op tasks in fresh interpreters against the same server; the
    provision stage's full topology apply against its fingerprint check; and with
    ``--compare CLUSTERFLOW`` another checkout's CLI interleaved (before/after in one run).
(b) a sweep of N one-second jobs on the local Slurm: ``clusterflow run`` (one job array,
    each point its own Prefect task run, outputs published with sha256) against a bare
    ``sbatch --array=0-(N-1)%M`` of the same command plus waiting for it. Goal: <= 1.3;
    the per-point orchestration overhead is (clusterflow - bare) / N.

Runs are interleaved (bare, clusterflow, bare, ...) so a noisy machine hurts both alike.

    python bench/steps_overhead.py                    # needs `make slurm`
    python bench/steps_overhead.py --points 8 --job-seconds 5 --repeat 1   # smoke
    python bench/steps_overhead.py --no-sweep        # (a) and its phases only, no Slurm
    python bench/steps_overhead.py --no-sweep --samples 1000 --repeat 3   # fixed costs only
    python bench/steps_overhead.py --no-sweep --compare /work/main/.venv/bin/clusterflow
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

from flows import phase_clock  # noqa: E402
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


# The marks `clusterflow run` writes with CLUSTERFLOW_PHASE_FILE (flows/phase_clock.py), in
# order; each names the phase that ends at it. The bench adds the process's start and end.
HANDED_OVER = "client start, hand-over to the warm runner"  # flows.warm_runner, warm runs only
RUN_MARKS = ("python start, CLI imports", "spec load and validation", "preflight",
             "Prefect and pipeline imports", "flow-run creation", "flow body", "artifacts",
             "flow-run teardown", "output")


def run_phases(t0: float, t1: float, marks: list[tuple[str, float]],
               stages: dict[str, float], bare_s: float) -> dict[str, float]:
    """One run's seconds per phase, from its own marks: they add up to its wall time.

    The flow body is split into the run's own stage timings (its ``--json`` ``seconds``);
    the job itself is the bare run's median, so "steps" is only the orchestration around
    it. What is left of the body (between stages: Prefect's task-run bookkeeping, the
    summary) is its own row.
    """
    at = dict(marks)
    missing = [m for m in RUN_MARKS if m not in at]
    if missing:
        raise RuntimeError(f"the run wrote no phase marks for {missing}")
    table: dict[str, float] = {}
    prev = t0
    for name in ((HANDED_OVER,) if HANDED_OVER in at else ()) + RUN_MARKS:
        if name == "flow body":
            body = at[name] - prev
            for stage, secs in stages.items():
                if stage == "steps":
                    table["job (the bare run's median)"] = round(bare_s, 3)
                    table["stage: steps, around the job"] = round(secs - bare_s, 3)
                else:
                    table[f"stage: {stage}"] = secs
            table["flow body between stages"] = round(body - sum(stages.values()), 3)
        else:
            table[name] = round(at[name] - prev, 3)
        prev = at[name]
    table["process exit"] = round(t1 - prev, 3)
    return table


# Prefect's own floor, in fresh interpreters against the same server: an empty flow, and
# one with as many no-op tasks as the one-step run has (provision, the step, publish,
# consume), heartbeat off as the CLI has it. Nothing clusterflow does is in these. The
# flows take no parameters: Prefect would import FastAPI to encode any (flows/prefect_flow.py).
_FLOOR = ("import time, sys; t = time.time(); "
          "from prefect import flow, task; "
          "from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY as H, "
          "temporary_settings; "
          "noop = task(lambda: None, name='noop'); "
          "f = flow(lambda: [noop() for _ in range({n})], name='bench-floor'); "
          "t1 = time.time()\n"
          "with temporary_settings(updates={{H: None}}): f()\n"
          "sys.stdout.write(f'{{t1 - t}} {{time.time() - t1}}')")
FLOOR_PROBES = {"python -c pass": "pass", "empty Prefect flow": _FLOOR.format(n=0),
                "Prefect flow with 4 no-op tasks": _FLOOR.format(n=4)}


def prefect_floor(repeat: int, env: dict[str, str]) -> dict[str, dict[str, float]]:
    """Median wall, import and flow seconds of each floor probe, interleaved."""
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in FLOOR_PROBES}
    for _ in range(repeat):
        for name, code in FLOOR_PROBES.items():
            out: list[str] = []
            wall = _timed([sys.executable, "-c", code], env, REPO, out)
            imp, run = (float(x) for x in out[0].split()) if out[0] else (0.0, 0.0)
            times[name].append((wall, imp, run))
    return {k: {"wall_s": round(statistics.median(w for w, _, _ in v), 3),
                "import_s": round(statistics.median(i for _, i, _ in v), 3),
                "flow_s": round(statistics.median(r for _, _, r in v), 3)}
            for k, v in times.items()}


def _median_table(tables: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(t[k] for t in tables), 3) for k in tables[0]}


def single_job(samples: int, repeat: int, work: Path, env: dict[str, str],
               compare: Path | None = None) -> dict[str, Any]:
    """(a): the same pi.py run bare, through the warm runner and in-process on a warm local
    stack; with ``compare``, also through that ``clusterflow`` (another checkout's, e.g.
    main's venv), interleaved, for a before/after in one run."""
    argv = [sys.executable, str(PI), "--samples", str(samples), "--out",
            str(work / "bare" / "estimate.json")]
    bare_cmd = MpiexecLauncher(oversubscribe=True).command(2, argv)
    spec = _spec(work / "one.yaml", [{
        "name": "pi", "command": ["python", str(PI), "--samples", str(samples), "--out",
                                  "{out}/estimate.json"]}])
    run_cmd = [str(BIN / "clusterflow"), "run", "--spec", str(spec), "--json"]
    ways = {"warm runner": {**env, "CLUSTERFLOW_NO_WARM_RUNNER": "0"},
            "in-process": {**env, "CLUSTERFLOW_NO_WARM_RUNNER": "1"}}
    bare: list[float] = []
    load: list[float] = []
    other: list[float] = []
    got: dict[str, dict[str, list[Any]]] = {w: {"wall": [], "outs": [], "marks": [],
                                                "spans": []} for w in ways}
    other_cmd = [str(compare), *run_cmd[1:]] if compare else None
    # One untimed run first: the stack's topology is applied (and fingerprinted) once, as
    # on any stack that has run this spec before.
    _timed(run_cmd, env, work)
    _runner_ready(Path(env["CLUSTERFLOW_HOME"]))
    for i in range(repeat):
        if other_cmd:
            other.append(_timed(other_cmd, env, work))
        load.append(os.getloadavg()[0])
        bare.append(_timed(bare_cmd, env, work))
        for way, way_env in (ways.items() if i % 2 == 0 else reversed(ways.items())):
            phase_file = work / f"phases-{i}-{way.replace(' ', '-')}.txt"
            t0 = time.time()
            g = got[way]
            g["wall"].append(_timed(run_cmd, {**way_env, phase_clock.ENV: str(phase_file)},
                                    work, g["outs"]))
            g["spans"].append((t0, time.time()))
            g["marks"].append(phase_clock.read(phase_file))
            warm = any(name == HANDED_OVER for name, _ in g["marks"][-1])
            if warm != (way == "warm runner"):  # never report a fallback as a warm run
                raise RuntimeError(f"run {i} ({way}) {'did' if warm else 'did not'} go "
                                   "through the warm runner")
    load.append(os.getloadavg()[0])
    b = statistics.median(bare)
    out: dict[str, Any] = {"samples": samples, "bare_s": bare, "load_average_1m": load}
    for way, g in got.items():
        runs = [json.loads(o.strip().splitlines()[-1])["seconds"] for o in g["outs"]]
        tables = [run_phases(t0, t1, m, st, b)
                  for (t0, t1), m, st in zip(g["spans"], g["marks"], runs, strict=True)]
        f = statistics.median(g["wall"])
        out[way] = {"clusterflow_s": g["wall"], "ratio": round(f / b, 3),
                    "fixed_overhead_s": round(f - b, 2), "stage_seconds": runs,
                    "phases_per_run_s": tables, "phases_s": _median_table(tables)}
    out["start_s"] = start_costs(max(3, repeat), spec, env)
    out["provision_topology"] = provision_costs(max(5, repeat), spec,
                                                Path(env["CLUSTERFLOW_HOME"]))
    out["prefect_floor"] = prefect_floor(max(3, repeat), env)
    out["compare"] = {"cli": str(compare), "clusterflow_s": other,
                      "ratio": round(statistics.median(other) / b, 3)} if other else None
    return out


def _runner_ready(home: Path, timeout: float = 120.0) -> None:
    """Wait until the stack's runner answers on current code (it reloads itself after an
    edit, declining runs meanwhile)."""
    from flows.warm_runner import ping

    deadline = time.monotonic() + timeout
    while (reply := ping(home)) is None or reply.get("stale"):
        if time.monotonic() > deadline:
            raise SystemExit(f"the warm runner in {home} does not answer; see its log")
        time.sleep(0.5)


def _bare_array(sbatch: list[str], env: dict[str, str], cwd: Path) -> float:
    """Submit the bare array and see its end as promptly as clusterflow does (a 0.1 s poll).

    Not ``sbatch --wait``: it polls with a growing interval, so the bare array's end was seen
    up to ~10 s late and a 32-point sweep measured 0.76 of bare.
    """
    t0 = time.perf_counter()
    job = subprocess.run(sbatch, env=env, cwd=cwd, capture_output=True, text=True,
                         check=True).stdout.strip().split(";")[0]
    while subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                         text=True).stdout.strip():
        time.sleep(0.1)
    return time.perf_counter() - t0


def sweep(points: int, job_seconds: float, max_parallel: int, repeat: int, work: Path,
          env: dict[str, str]) -> dict[str, Any]:
    """(b): N one-second jobs as a bare job array and as a clusterflow sweep on Slurm."""
    script = work / "bare.sbatch"
    script.write_text("#!/bin/bash\nexec " + " ".join(SLEEPER[:2]) + " "
                      + json.dumps(SLEEPER[2]) + f" {job_seconds}\n")
    sbatch = ["sbatch", "--parsable", f"--array=0-{points - 1}%{max_parallel}",
              "--ntasks=1", f"--output={work}/bare-%a.out", str(script)]
    spec = _spec(work / "sweep.yaml", [{
        "name": "sleep", "backend": "slurm", "launcher": "none", "ranks": 1,
        "command": [*SLEEPER, "{params.seconds}"], "parameters": {"seconds": job_seconds},
        "sweep": {"i": {"range": [0, points]}, "max_parallel": max_parallel}}])
    run_cmd = [str(BIN / "clusterflow"), "run", "--spec", str(spec), "--json"]
    bare, flow = [], []
    for _ in range(repeat):
        bare.append(_bare_array(sbatch, env, work))
        flow.append(_timed(run_cmd, env, work))
    b, f = statistics.median(bare), statistics.median(flow)
    return {"points": points, "job_seconds": job_seconds, "max_parallel": max_parallel,
            "bare_s": bare, "clusterflow_s": flow, "ratio": round(f / b, 3),
            "overhead_per_point_ms": round(1000 * (f - b) / points, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=250_000_000,
                    help="pi.py samples (250 M: ~25 s on 2 ranks of this VM)")
    ap.add_argument("--points", type=int, default=64)
    ap.add_argument("--job-seconds", type=float, default=1.0)
    ap.add_argument("--max-parallel", type=int, default=2, help="the local Slurm has 2 CPUs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compare", type=Path, default=None, metavar="CLUSTERFLOW",
                    help="another clusterflow executable to run the single job with, "
                         "interleaved (e.g. /work/main/.venv/bin/clusterflow: before/after)")
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
            one = single_job(args.samples, args.repeat, work, env, args.compare)
            many = None if args.no_sweep else sweep(
                args.points, args.job_seconds, args.max_parallel, args.repeat, work, env)
        finally:
            subprocess.run([str(BIN / "clusterflow"), "local", "down"], env=env, cwd=REPO,
                           capture_output=True)
    warm, cold = one["warm runner"], one["in-process"]
    b = statistics.median(one["bare_s"])
    table = Table("measure", "bare", "clusterflow", "ratio", "goal", box=None)
    for way, r in (("warm runner", warm), ("in-process", cold)):
        table.add_row(f"one {b:.0f} s job, warm stack, {way} (median s)", f"{b:.1f}",
                      f"{statistics.median(r['clusterflow_s']):.1f}", f"{r['ratio']:.3f}",
                      "<= 1.05")
    if many:
        table.add_row(f"{args.points}-point sweep of {args.job_seconds:g} s jobs on Slurm "
                      "(median s)", f"{statistics.median(many['bare_s']):.1f}",
                      f"{statistics.median(many['clusterflow_s']):.1f}",
                      f"{many['ratio']:.3f}", "<= 1.3")
    if one["compare"]:
        c = one["compare"]
        table.add_row(f"  the same, {c['cli']} (interleaved)", f"{b:.1f}",
                      f"{statistics.median(c['clusterflow_s']):.1f}", f"{c['ratio']:.3f}", "")
    console.print(table)
    console.print(f"fixed overhead per run: {warm['fixed_overhead_s']} s through the warm "
                  f"runner, {cold['fixed_overhead_s']} s in-process"
                  + (f"; orchestration per sweep point: {many['overhead_per_point_ms']} ms"
                     if many else ""))
    job = "job (the bare run's median)"
    fixed = Table(f"where one run's seconds go (median of {args.repeat} runs each, from the "
                  "runs' own marks)", "warm runner", "in-process", box=None)
    phases = [*warm["phases_s"], *(p for p in cold["phases_s"] if p not in warm["phases_s"])]
    for phase in phases:
        cells = [f"{r['phases_s'][phase]:.3f}" if phase in r["phases_s"] else "-"
                 for r in (warm, cold)]
        fixed.add_row(phase, *cells)
    fixed.add_row("[bold]fixed (all but the job)[/]",
                  *(f"{sum(v for k, v in r['phases_s'].items() if k != job):.3f}"
                    for r in (warm, cold)))
    console.print(fixed)
    load = one["load_average_1m"]
    console.print(f"load average (1 min) during the runs: {min(load):.1f}-{max(load):.1f}")
    floor = Table("Prefect's own floor, fresh interpreters (median)", "wall", "imports",
                  "flow run", box=None)
    for name, t in one["prefect_floor"].items():
        floor.add_row(name, f"{t['wall_s']:.3f}", f"{t['import_s']:.3f}", f"{t['flow_s']:.3f}")
    console.print(floor)
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
