"""A ``clusterflow-slurm`` worker that restarts adopts the runs its predecessor left behind.

The first worker is killed with SIGKILL while its jobs run on in Slurm. The second worker must
find the pool's active flow runs by their Slurm job ids and settle each one from what Slurm
knows: a job that died while no worker ran (exit 3, never reported to Prefect) makes the run
Crashed with Slurm's exit; a job Slurm has no record of makes it Crashed saying so; a job
still running is watched, so a cancel issued after the restart still reaches ``scancel``.
A run cancelled while its job still waits in the queue is ``scancel``'ed too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import InfrastructureNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling, Running

from flows.slurm_worker import SlurmJobConfiguration, SlurmWorker
from infra.backends.providers.base import JobHandle, JobState
from infra.backends.providers.polling import wait
from infra.backends.providers.slurm import SlurmProvider
from infra.clusters.slurm_local import LocalSlurm
from tests.slurm_fixtures import ensure_local_slurm
from tests.slurm_pool import create_pool, start_worker, stop_worker, wait_run

FLOW = '''
import json, os, pathlib, time
from prefect import flow

@flow
def where(out: str, sleep: float = 0.0, exit_code: int = -1) -> str:
    pathlib.Path(out).write_text(json.dumps({"job": os.environ.get("SLURM_JOB_ID")}))
    time.sleep(sleep)
    if exit_code >= 0:
        os._exit(exit_code)  # gone without a word to Prefect, as a segfault or an OOM kill
    return os.environ.get("SLURM_JOB_ID", "")
'''
NO_SUCH_JOB = "60000000"  # above any id the local Slurm hands out in a test session


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def _job(job_id: str) -> JobHandle:
    return JobHandle(job_id=job_id, stdout=Path("/dev/null"), stderr=Path("/dev/null"))


def test_a_restarted_worker_adopts_the_runs_it_left_and_still_cancels_them(
        local_slurm, prefect_api, tmp_path):
    conf = local_slurm.layout.conf
    provider = SlurmProvider(slurm_conf=conf)
    project = tmp_path / "project"
    project.mkdir()
    (project / "where.py").write_text(FLOW)
    log1, log2 = tmp_path / "worker1.log", tmp_path / "worker2.log"
    workers: list[subprocess.Popen[bytes]] = []
    jobs: list[str] = []
    with temporary_settings({PREFECT_API_URL: prefect_api}), \
            get_client(sync_client=True) as client:
        pool = create_pool(client, f"slurm-restart-{os.getpid()}", conf, tmp_path / "jobs")
        deployment = client.create_deployment(
            flow_id=client.create_flow_from_name("where"), name="restart", work_pool_name=pool,
            entrypoint="where.py:where", path=str(project), job_variables={"tasks": 1},
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {
                "directory": str(project)}}])
        try:
            workers.append(start_worker(pool, prefect_api, log1))
            dies = client.create_flow_run_from_deployment(deployment, parameters={
                "out": str(tmp_path / "dies.json"), "sleep": 8, "exit_code": 3})
            lives = client.create_flow_run_from_deployment(deployment, parameters={
                "out": str(tmp_path / "lives.json"), "sleep": 300})
            for run, out in ((dies, "dies.json"), (lives, "lives.json")):
                wait_run(client, run.id, lambda r, o=out: r.state_name == "Running"
                         and (tmp_path / o).exists(), log=log1)
            dies_job = client.read_flow_run(dies.id).infrastructure_pid
            lives_job = client.read_flow_run(lives.id).infrastructure_pid
            jobs += [dies_job, lives_job]
            assert json.loads((tmp_path / "lives.json").read_text())["job"] == lives_job

            stop_worker(workers[0], signal.SIGKILL)  # no goodbye, no cleanup
            # A run whose job Slurm never heard of (its record lost with the controller).
            lost = client.create_flow_run_from_deployment(
                deployment, parameters={"out": str(tmp_path / "lost.json")}, state=Running())
            client.update_flow_run(lost.id, infrastructure_pid=NO_SUCH_JOB)
            # The dying job ends while no worker watches: Slurm knows, Prefect does not.
            ended = wait(provider, _job(dies_job), timeout=120)
            assert ended.state is JobState.FAILED and ended.exit_code == 3, ended
            assert client.read_flow_run(dies.id).state_name == "Running"

            workers.append(start_worker(pool, prefect_api, log2))
            dies_run = wait_run(client, dies.id, lambda r: r.state.is_final(), log=log2)
            assert dies_run.state_name == "Crashed"
            assert f"Slurm job {dies_job} ended" in dies_run.state.message
            assert "exit 3" in dies_run.state.message
            lost_run = wait_run(client, lost.id, lambda r: r.state.is_final(), log=log2)
            assert lost_run.state_name == "Crashed"
            assert f"Slurm job {NO_SUCH_JOB} is unknown" in lost_run.state.message
            # The live job was adopted, not touched: still running in Slurm and in Prefect.
            assert f"adopting flow run {lives.name}" in log2.read_text()
            assert provider.status(_job(lives_job)).state is JobState.RUNNING
            assert client.read_flow_run(lives.id).state_name == "Running"

            # A cancel from the API after the restart reaches scancel through the new worker.
            client.set_flow_run_state(lives.id, Cancelling(), force=True)
            assert wait(provider, _job(lives_job), timeout=120).state is JobState.CANCELLED
            wait_run(client, lives.id, lambda r: r.state_name == "Cancelled", timeout=60,
                     log=log2)
            assert f"scancel {lives_job}" in log2.read_text()

            # Cancelled while its job still waits in the queue: scancel'ed before it starts.
            queued = client.create_flow_run_from_deployment(
                deployment, parameters={"out": str(tmp_path / "queued.json")},
                job_variables={"sbatch_args": ["--begin=now+3600"]})
            queued = wait_run(client, queued.id, lambda r: bool(r.infrastructure_pid),
                              log=log2)
            jobs.append(queued.infrastructure_pid)
            assert provider.status(_job(queued.infrastructure_pid)).state is JobState.PENDING
            client.set_flow_run_state(queued.id, Cancelling(), force=True)
            assert wait(provider, _job(queued.infrastructure_pid),
                        timeout=120).state is JobState.CANCELLED
            wait_run(client, queued.id, lambda r: r.state_name == "Cancelled", timeout=60,
                     log=log2)
            assert not (tmp_path / "queued.json").exists()
        finally:
            for worker in workers:
                stop_worker(worker)
            for job_id in jobs:
                subprocess.run(["scancel", job_id], env=provider.env(), timeout=30,
                               capture_output=True)


def test_kill_infrastructure_scancels_a_queued_job_and_knows_a_missing_one(
        local_slurm, tmp_path):
    """Prefect's cancellation observer cancels a run that has not started through
    ``kill_infrastructure``: it must scancel the job, and report a job Slurm does not know
    as InfrastructureNotFound (Prefect then just marks the run Cancelled)."""
    conf = local_slurm.layout.conf
    provider = SlurmProvider(slurm_conf=conf, sbatch_args=["--begin=now+3600"])
    job = provider.submit(["sleep", "600"], ranks=1, job_name="kill-me", workdir=tmp_path)
    try:
        assert provider.status(job).state is JobState.PENDING
        worker = SlurmWorker(work_pool_name="unused")
        config = SlurmJobConfiguration(slurm_conf=str(conf))
        asyncio.run(worker.kill_infrastructure(job.job_id, config))
        assert provider.status(job).state is JobState.CANCELLED
        with pytest.raises(InfrastructureNotFound, match=NO_SUCH_JOB):
            asyncio.run(worker.kill_infrastructure(NO_SUCH_JOB, config))
    finally:
        subprocess.run(["scancel", job.job_id], env=provider.env(), timeout=30,
                       capture_output=True)
