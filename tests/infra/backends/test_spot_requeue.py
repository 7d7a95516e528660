"""A Spot reclaim on the real local Slurm: requeued, resumed from its checkpoint, bitwise equal.

``scontrol requeue JOBID`` mid-job is what Slurm does to a job whose node is lost when the job
was submitted with ``--requeue``: the batch script is killed and started again (with
``SLURM_RESTART_COUNT`` one higher) once the job is scheduled anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from infra.backends.launchers import python_module
from infra.backends.providers.base import JobState
from infra.backends.providers.slurm import SlurmProvider
from infra.backends.providers.spot import (
    attempts_file,
    batch_retry_strategy,
    read_interruptions,
)
from infra.clusters.slurm_local.cluster import LocalSlurm
from mpi_jobs.catalog import KERNELS, HeatParameters
from tests.infra.backends.test_spot_array_requeue import SLOW, reclaim, reclaim_node
from tests.slurm_fixtures import ensure_local_slurm

REPO = Path(__file__).resolve().parents[3]
HEAT = KERNELS["heat"]
PARAMS = HeatParameters(nx=256, ny=256, steps=1000, diag_every=0)
EVERY = 100


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _newest_step(ck: Path) -> int:
    done = [json.loads(c.read_text())["step"] for c in ck.glob("*/COMPLETE.json")]
    return max(done, default=0)


def _run(work: Path, *, requeue_at: int | None, max_interruptions: int = 2,
         timeout: float = 400, how: Callable[[str, dict[str, str]], None] = reclaim,
         ) -> tuple[JobState, str, Path]:
    """Heat on 2 ranks with checkpoints; ``scontrol requeue`` once a checkpoint past
    ``requeue_at`` is complete (the reclaim)."""
    work.mkdir(parents=True)
    inp = work / "in.npy"
    HEAT.make_input(PARAMS, inp)
    argv = python_module(HEAT.module, *HEAT.argv(
        PARAMS, inp, work / "out", checkpoint_dir=work / "ck", checkpoint_every=EVERY,
        restart=True))
    provider = SlurmProvider(launcher="mpiexec", overcommit=True, requeue=True,
                             max_interruptions=max_interruptions)
    job = provider.submit(provider.launcher().command(2, argv), ranks=2, job_name="heat",
                          workdir=work, env={"PYTHONPATH": str(REPO), **SLOW})
    deadline = time.monotonic() + timeout
    while True:
        status = provider.status(job)
        if requeue_at is not None and _newest_step(work / "ck") >= requeue_at:
            how(job.job_id, os.environ | {"SLURM_CONF": str(provider.slurm_conf)})
            requeue_at = None
        if status.state in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED):
            return status.state, job.job_id, work
        assert time.monotonic() < deadline, f"job {job.job_id} still {status.state}"
        time.sleep(0.2)


def test_a_reclaimed_job_resumes_from_its_checkpoint_bitwise_identical(local_slurm, tmp_path):
    state, _, clean = _run(tmp_path / "clean", requeue_at=None)
    assert state is JobState.COMPLETED, (clean / "heat.err").read_text()
    assert read_interruptions(attempts_file(clean, "heat")).count == 0

    state, _, hit = _run(tmp_path / "reclaimed", requeue_at=300)
    log = (hit / "heat.out").read_text()
    assert state is JobState.COMPLETED, (hit / "heat.err").read_text()
    lost = read_interruptions(attempts_file(hit, "heat"))
    assert lost.count == 1 and lost.seconds_lost > 0
    restarted = [ln for ln in log.splitlines() if "restarting from step" in ln]
    assert restarted, log  # resumed, not started over
    assert int(restarted[-1].split("restarting from step ")[1].split()[0]) >= 300
    assert _sha(hit / "out" / "field.npy") == _sha(clean / "out" / "field.npy")


def test_a_node_lost_mid_job_requeues_it_and_it_resumes_bitwise(local_slurm, tmp_path):
    """The node set DOWN under the running job (as for a reclaimed Spot node), not a
    requeue asked for by hand: Slurm records NODE_FAIL for the attempt and requeues it."""
    state, _, clean = _run(tmp_path / "clean", requeue_at=None)
    assert state is JobState.COMPLETED, (clean / "heat.err").read_text()
    state, job_id, hit = _run(tmp_path / "node", requeue_at=300, how=reclaim_node)
    assert state is JobState.COMPLETED, (hit / "heat.err").read_text()
    assert read_interruptions(attempts_file(hit, "heat")).count == 1
    assert "restarting from step" in (hit / "heat.out").read_text()
    assert _sha(hit / "out" / "field.npy") == _sha(clean / "out" / "field.npy")


def test_past_max_interruptions_the_job_is_not_resumed(local_slurm, tmp_path):
    state, _, work = _run(tmp_path / "bounded", requeue_at=200, max_interruptions=0)
    assert state is JobState.FAILED
    assert "interrupted 1 times, past max_interruptions=0" in (work / "heat.err").read_text()
    assert not (work / "out" / "field.npy").exists()


def test_the_script_asks_for_requeue_and_guards_the_bound(tmp_path):
    provider = SlurmProvider(requeue=True, max_interruptions=4, slurm_conf=tmp_path / "none")
    cmd = provider.sbatch_command(ranks=2, job_name="j", workdir=tmp_path, stdout=tmp_path / "o",
                                  stderr=tmp_path / "e", script=tmp_path / "s", requeue=True)
    assert "--requeue" in cmd and "--open-mode=append" in cmd
    plain = SlurmProvider(slurm_conf=tmp_path / "none").sbatch_command(
        ranks=2, job_name="j", workdir=tmp_path, stdout=tmp_path / "o", stderr=tmp_path / "e",
        script=tmp_path / "s")
    assert "--requeue" not in plain


def test_batch_retries_only_a_spot_reclaim():
    strategy = batch_retry_strategy(2)
    assert strategy["attempts"] == 3
    assert strategy["evaluateOnExit"][0] == {"onStatusReason": "Host EC2*", "action": "RETRY"}
    assert strategy["evaluateOnExit"][-1]["action"] == "EXIT"
