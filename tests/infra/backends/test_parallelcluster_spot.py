"""ParallelCluster on a Spot queue: a reclaimed job is requeued, not reported failed.

The provider's scripts run with bash against the real local Slurm, as SSM runs them on a head
node. The batch script's EXIT trap writes ``<job>.exitcode``; the attempt a reclaim kills
writes one too, and the status logic must not take it for the job's result: the trap keys it
by ``SLURM_RESTART_COUNT`` and a file from an attempt older than Slurm's ``Restarts`` is not
final. The resumed job ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

from infra.backends.launchers import python_module
from infra.backends.providers.base import JobState
from infra.backends.providers.parallelcluster import (
    ParallelClusterProvider,
    exit_file,
    status_from,
)
from infra.backends.remote_shell import LocalShell
from infra.backends.settings import ParallelClusterSettings
from infra.clusters.slurm_local import LocalSlurm, slurm_env
from mpi_jobs.catalog import KERNELS, HeatParameters
from tests.infra.backends.test_spot_array_requeue import SLOW, reclaim
from tests.slurm_fixtures import REPO, ensure_local_slurm

HEAT = KERNELS["heat"]
PARAMS = HeatParameters(nx=192, ny=192, steps=800, diag_every=0)
EVERY = 100


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


@pytest.fixture
def head_node(local_slurm: LocalSlurm, tmp_path: Path) -> ParallelClusterProvider:
    env = {**slurm_env(local_slurm.layout.root), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PYTHONPATH": str(REPO)}
    return ParallelClusterProvider(LocalShell(env=env), remote_root=str(tmp_path / "fsx"),
                                   run_as=None, python=sys.executable, requeue=True,
                                   max_interruptions=2)


def test_an_exit_file_from_a_reclaimed_attempt_is_not_the_result() -> None:
    requeued = "JobId=7 JobName=heat JobState=PENDING Reason=BeginTime Restarts=1 ExitCode=0:0"
    # The killed attempt 0 left "143 0"; Slurm has counted the requeue: still on its way.
    status = status_from("143 0\n", requeued)
    assert status.state is JobState.PENDING and status.exit_code is None
    running = requeued.replace("PENDING Reason=BeginTime", "RUNNING Reason=None")
    assert status_from("143 0\n", running).state is JobState.RUNNING
    # The resumed attempt's own file is its result, even before Slurm says COMPLETED.
    done = status_from("0 1\n", running.replace("RUNNING", "COMPLETING"))
    assert (done.state, done.exit_code) == (JobState.COMPLETED, 0)
    failed = status_from("3 2\n", running.replace("Restarts=1", "Restarts=2"))
    assert (failed.state, failed.exit_code) == (JobState.FAILED, 3)
    # Without requeue (or from an older clusterflow) the file holds the code alone.
    assert exit_file("3\n") == 3 and exit_file("3\n", "0") == 3
    assert exit_file("143 0", "1") is None and exit_file("143 0", "") == 143
    assert exit_file("") is None and exit_file("oops") is None


def test_the_spot_script_asks_for_requeue_and_guards_the_bound(tmp_path: Path) -> None:
    provider = ParallelClusterProvider(LocalShell(), remote_root="/fsx/cf", partition="cpu-spot",
                                       requeue=True, max_interruptions=4)
    script = provider.batch_script(["true"], ranks=2, job_name="heat", directory="/fsx/cf/r1",
                                   env={})
    lines = script.splitlines()
    assert "#SBATCH --requeue" in lines and "#SBATCH --open-mode=append" in lines
    assert "past max_interruptions=4" in script and "/fsx/cf/r1/heat.attempts" in script
    assert "${SLURM_RESTART_COUNT:-0}" in script
    # #SBATCH lines must come before the first command, or sbatch ignores them.
    first_command = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert max(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")) < first_command
    plain = dataclasses.replace(provider, requeue=False).batch_script(
        ["true"], ranks=2, job_name="heat", directory="/fsx/cf/r1", env={})
    assert "--requeue" not in plain and "max_interruptions" not in plain


@pytest.mark.parametrize("config,spot", [("efa-spot-us-east-1.yaml", True),
                                          ("efa-ondemand-us-east-2.yaml", False)])
def test_a_spot_queue_makes_the_backend_requeue(config: str, spot: bool) -> None:
    settings = ParallelClusterSettings(config=REPO / "cluster_configs" / config,
                                       cluster_name="cf-spot")
    assert settings.spot is spot


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _newest_step(ck: Path) -> int:
    done = [json.loads(c.read_text())["step"] for c in ck.glob("*/COMPLETE.json")]
    return max(done, default=0)


def _run(provider: ParallelClusterProvider, root: Path, name: str, *,
         reclaim_at: int | None) -> tuple[list[JobState], Path, object, set[str]]:
    """Heat with checkpoints on the 'cluster'; every state status() reported, in order, and
    every exit file seen on the way."""
    remote = root / "fsx" / name
    remote.mkdir(parents=True)
    HEAT.make_input(PARAMS, remote / "in.npy")
    argv = python_module(HEAT.module, *HEAT.argv(
        PARAMS, remote / "in.npy", remote / "out", checkpoint_dir=remote / "ck",
        checkpoint_every=EVERY, restart=True))
    job = provider.submit(provider.launcher().command(1, argv), ranks=1, job_name="heat",
                          workdir=root / "local" / name, env=SLOW)
    seen: list[JobState] = []
    exit_files: set[str] = set()
    deadline = time.monotonic() + 300
    while True:
        if reclaim_at is not None and _newest_step(remote / "ck") >= reclaim_at:
            reclaim(job.job_id, os.environ | dict(provider.shell.env))  # type: ignore[attr-defined]
            reclaim_at = None
        status = provider.status(job)
        if (remote / "heat.exitcode").exists():
            exit_files.add((remote / "heat.exitcode").read_text().strip())
        if not seen or seen[-1] is not status.state:
            seen.append(status.state)
        if status.state.terminal:
            return seen, remote, job, exit_files
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)


def test_a_reclaimed_job_is_requeued_resumed_and_counted(head_node: ParallelClusterProvider,
                                                         tmp_path: Path) -> None:
    seen, clean, job, _ = _run(head_node, tmp_path, "clean", reclaim_at=None)
    assert seen[-1] is JobState.COMPLETED, job.stderr.read_text()  # type: ignore[attr-defined]
    assert head_node.interruptions(job).count == 0  # type: ignore[arg-type]

    seen, hit, job, exit_files = _run(head_node, tmp_path, "hit", reclaim_at=300)
    err = job.stderr.read_text()  # type: ignore[attr-defined]
    assert seen[-1] is JobState.COMPLETED, (seen, err)
    # The killed attempt's trap did write a file (measured: "0 0", exit code 0 after srun was
    # signalled, so read alone it would have passed for a successful run), and it was never
    # taken as final.
    assert any(f.split()[1:] == ["0"] for f in exit_files), exit_files
    assert JobState.FAILED not in seen, seen
    assert "DUE TO JOB REQUEUE" in err
    assert (hit / "heat.exitcode").read_text().split() == ["0", "1"]  # code, attempt
    lost = head_node.interruptions(job)  # type: ignore[arg-type]
    assert lost.count == 1 and lost.seconds_lost > 0
    out = job.stdout.read_text()  # type: ignore[attr-defined]
    assert "restarting from step" in out, out
    assert _sha(hit / "out" / "field.npy") == _sha(clean / "out" / "field.npy")
