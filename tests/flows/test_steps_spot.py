"""A sweep on Spot-like Slurm through the real CLI: one point reclaimed mid-run, resumed,
and reported on its own in the run's summary (``spot`` per point), the text summary saying
which point was interrupted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import _steps_summary
from infra.clusters.slurm_local import LocalSlurm, slurm_env
from tests.conftest import run_cli
from tests.infra.backends.test_spot_array_requeue import SLOW, reclaim
from tests.slurm_fixtures import ensure_local_slurm


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def _newest_step(ck: Path) -> int:
    done = [json.loads(c.read_text())["step"] for c in ck.glob("*/COMPLETE.json")]
    return max(done, default=0)


def _reclaimer(scratch: Path, env: dict[str, str], at_step: int,
               stop: threading.Event, done: list[str]) -> None:
    """Requeue array element 1 of the 'sim' array once its point has a checkpoint at or past
    ``at_step`` (the reclaim), from beside the running CLI."""
    while not stop.is_set():
        cks = list(scratch.glob("*/sim/alpha=0.2/checkpoints"))
        if cks and _newest_step(cks[0]) >= at_step:
            ids = subprocess.run(["squeue", "-h", "-n", "sim", "-o", "%i"], env=env,
                                 capture_output=True, text=True).stdout.split()
            element = next((i for i in ids if i.endswith("_1")), None)
            if element:
                reclaim(element, env)
                done.append(element)
                return
        time.sleep(0.2)


def test_a_reclaimed_sweep_point_resumes_and_the_summary_says_so(aws, cli_env, tmp_path,
                                                                 local_slurm):
    cli_env.update(slurm_env(local_slurm.layout.root))
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    spec = tmp_path / "spot.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "spot-sweep", "ranks": 2, "backend": "slurm",
        "slurm": {"launcher": "mpiexec", "overcommit": True, "requeue": True,
                  "max_interruptions": 2},
        "storage": {"input_bucket": "spot-sweep-in", "results_bucket": "spot-sweep-out"},
        "steps": [{"name": "sim", "uses": "heat", "checkpoint_every": 100, "env": SLOW,
                   "parameters": {"nx": 192, "ny": 192, "steps": 800, "diag_every": 0},
                   "sweep": {"alpha": [0.1, 0.2], "max_parallel": 2}}]}))
    env = {**os.environ, **cli_env}
    stop, done = threading.Event(), []
    watcher = threading.Thread(target=_reclaimer, daemon=True, args=(
        tmp_path / ".clusterflow" / "scratch", env, 300, stop, done))
    watcher.start()
    try:
        proc = run_cli(["run", "--spec", str(spec), "--json"], cli_env, tmp_path, timeout=400)
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert done, "the point finished before it could be reclaimed"
    result = json.loads(proc.stdout)
    points = {p["point"]: p for p in result["steps"]["sim"]["points"]}
    hit, calm = points["alpha=0.2"], points["alpha=0.1"]
    assert hit["job_id"] == done[0] and hit["state"] == "completed"
    assert hit["spot"]["interruptions"] == 1 and hit["spot"]["seconds_lost"] > 0
    assert "spot" not in calm and calm["state"] == "completed"
    # The resumed point's published field is the uninterrupted one: recompute it here.
    scratch = next((tmp_path / ".clusterflow" / "scratch").glob("*/sim/alpha=0.2"))
    log = (scratch.parent / "logs" / "1.out").read_text()
    assert "restarting from step" in log, log
    field = next(f for f in hit["outputs"] if f["name"] == "field.npy")
    assert field["sha256"] == _uninterrupted_sha(scratch, tmp_path / "again")


def _uninterrupted_sha(point: Path, work: Path) -> str:
    """The same kernel on the same staged input without checkpoints or Slurm."""
    from infra.backends.launchers import MpiexecLauncher, python_module
    from mpi_jobs.catalog import KERNELS, HeatParameters

    heat = KERNELS["heat"]
    params = HeatParameters(nx=192, ny=192, steps=800, diag_every=0, alpha=0.2)
    (source,) = [p for p in (point / "in").iterdir() if p.is_file()]
    argv = python_module(heat.module, *heat.argv(params, source, work / "out"))
    subprocess.run(MpiexecLauncher().command(2, argv), check=True, capture_output=True,
                   timeout=300, env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1",
                                     "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    return hashlib.sha256((work / "out" / "field.npy").read_bytes()).hexdigest()


def test_the_text_summary_names_each_interrupted_point(capsys):
    result = {"run_id": "r1", "state": "succeeded", "aws": "x",
              "points": {"total": 2, "failed": 0}, "seconds": {"steps": 1.0},
              "steps": {"sim": {"points": [
                  {"point": "alpha=0.1", "state": "completed", "outputs": []},
                  {"point": "alpha=0.2", "state": "completed", "outputs": [],
                   "spot": {"interruptions": 1, "seconds_lost": 12.5}}]}},
              "s3": {"manifest": "s3://b/k"}, "result_sha256": "0" * 64,
              "scratch_dir": "/s", "fanout": {"queues": {}}}
    _steps_summary(result)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "interrupted" in ln]
    assert lines == ["interrupted       sim/alpha=0.2: 1 time(s), 12.5 s in interrupted "
                     "attempts"]
