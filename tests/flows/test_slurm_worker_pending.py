"""Runs a stopped ``clusterflow-slurm`` worker left without a job id, or left to a live peer.

A worker can die after it moved a run to Pending but before the run's job id was recorded
(before ``sbatch``, or before the id reached Prefect). The sweep must ask Slurm for the job by
its name (``prefect-<flow run id>``): a job that exists is adopted and never submitted again
(one job by that name in the job completion log); no job, and the run goes back to Scheduled
after the grace period and runs once. And a live worker of the pool takes over a dead peer's
running job without being restarted, while it leaves a live peer's runs alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling, Pending

from flows.slurm_recovery import WORKER_LABEL, job_name
from infra.backends.providers.base import JobHandle, JobState
from infra.backends.providers.polling import wait
from infra.backends.providers.slurm import SlurmProvider
from infra.clusters.slurm_local import LocalSlurm
from tests.slurm_fixtures import ensure_local_slurm
from tests.slurm_pool import (
    create_pool,
    start_worker,
    stop_worker,
    wait_log,
    wait_run,
    worker_name,
)

FLOW = '''
import json, os, pathlib, time
from prefect import flow

@flow
def where(out: str, sleep: float = 0.0) -> str:
    with open(out, "a") as f:  # one line per execution: a second run would show
        f.write(json.dumps({"job": os.environ.get("SLURM_JOB_ID")}) + "\\n")
    time.sleep(sleep)
    return os.environ.get("SLURM_JOB_ID", "")
'''
GRACE = 4.0


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def _job(job_id: str) -> JobHandle:
    return JobHandle(job_id=job_id, stdout=Path("/dev/null"), stderr=Path("/dev/null"))


def _completion_log(provider: SlurmProvider, name: str, job_id: str) -> list[str]:
    """The ids of the jobs called ``name`` in the job completion log, once ``job_id`` is."""
    deadline = time.monotonic() + 30  # the log is written as the job ends
    while True:
        proc = subprocess.run(["sacct", "-c", "-n", "-P", f"--name={name}", "-S",
                               "now-1days", "-o", "jobid,jobname,state"], env=provider.env(),
                              capture_output=True, text=True, timeout=60)
        rows = [r.split("|") for r in proc.stdout.splitlines() if r.count("|") == 2]
        if any(r[0] == job_id for r in rows) or time.monotonic() > deadline:
            return [r[0] for r in rows if r[1] == name]
        time.sleep(0.5)


def _executions(out: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def _cancel_reaches_scancel(client, provider: SlurmProvider, run_id, job_id: str,
                            log: Path):
    """Cancel the flow run from the API: its Slurm job ends CANCELLED by the worker's
    scancel, and the run ends Cancelled."""
    client.set_flow_run_state(run_id, Cancelling(), force=True)
    assert wait(provider, _job(job_id), timeout=120).state is JobState.CANCELLED
    done = wait_run(client, run_id, lambda r: r.state_name == "Cancelled", timeout=60, log=log)
    assert f"scancel {job_id}" in log.read_text()
    return done


def _clean_up(workers: list[subprocess.Popen[bytes]], provider: SlurmProvider,
              job_id: str | None) -> None:
    for worker in workers:
        stop_worker(worker)
    if job_id:
        subprocess.run(["scancel", job_id], env=provider.env(), timeout=30,
                       capture_output=True)


def _setup(client, tmp_path: Path, conf: Path, tag: str):
    project = tmp_path / "project"
    project.mkdir()
    (project / "where.py").write_text(FLOW)
    pool = create_pool(client, f"slurm-{tag}-{os.getpid()}", conf, tmp_path / "jobs")
    deployment = client.create_deployment(
        flow_id=client.create_flow_from_name("where"), name=tag, work_pool_name=pool,
        entrypoint="where.py:where", path=str(project), job_variables={"tasks": 1},
        pull_steps=[{"prefect.deployments.steps.set_working_directory": {
            "directory": str(project)}}])
    return pool, deployment


def test_a_run_left_pending_without_a_job_is_rescheduled_and_runs_once(
        local_slurm, prefect_api, tmp_path):
    conf = local_slurm.layout.conf
    provider = SlurmProvider(slurm_conf=conf)
    log = tmp_path / "worker.log"
    worker = None
    with temporary_settings({PREFECT_API_URL: prefect_api}), \
            get_client(sync_client=True) as client:
        pool, deployment = _setup(client, tmp_path, conf, "no-job")
        out = tmp_path / "out.jsonl"
        run = client.create_flow_run_from_deployment(deployment, parameters={"out": str(out)})
        # As a worker leaves it that claimed the run and died before sbatch.
        client.set_flow_run_state(run.id, Pending(), force=True)
        client.update_flow_run_labels(run.id, {WORKER_LABEL: "SlurmWorker-gone"})
        pending = client.read_flow_run(run.id).state
        try:
            worker = start_worker(pool, prefect_api, log,
                                  {"CLUSTERFLOW_SLURM_PENDING_GRACE_SECONDS": str(GRACE)})
            done = wait_run(client, run.id, lambda r: r.state.is_final(), log=log)
            assert done.state_name == "Completed", done.state.message
            states = client.read_flow_run_states(run.id)
            back = [s for s in states if s.type.value == "SCHEDULED"
                    and s.timestamp > pending.timestamp]
            assert len(back) == 1 and back[0].message.startswith("rescheduled: Pending for")
            assert (back[0].timestamp - pending.timestamp).total_seconds() >= GRACE
            assert f"flow run {run.name}: Pending for" in log.read_text()
            # It ran once, in the one job named after it.
            job_id = done.infrastructure_pid
            assert _executions(out) == [{"job": job_id}]
            assert wait(provider, _job(job_id), timeout=60).state is JobState.COMPLETED
            assert _completion_log(provider, job_name(run.id), job_id) == [job_id]
        finally:
            if worker is not None:
                stop_worker(worker)


@pytest.mark.parametrize("queued", [True, False], ids=["queued", "running"])
def test_a_run_left_without_its_job_id_adopts_the_job_it_has(
        local_slurm, prefect_api, tmp_path, queued):
    """The worker died after sbatch, before the job id reached Prefect: with the job held in
    the queue (the run still Pending), or already running the flow (Running)."""
    conf = local_slurm.layout.conf
    provider = SlurmProvider(slurm_conf=conf)
    log1, log2 = tmp_path / "worker1.log", tmp_path / "worker2.log"
    workers: list[subprocess.Popen[bytes]] = []
    job_id = None
    with temporary_settings({PREFECT_API_URL: prefect_api}), \
            get_client(sync_client=True) as client:
        pool, deployment = _setup(client, tmp_path, conf, f"has-job-{queued}")
        out = tmp_path / "out.jsonl"
        try:
            workers.append(start_worker(pool, prefect_api, log1))
            run = client.create_flow_run_from_deployment(
                deployment, parameters={"out": str(out), "sleep": 0 if queued else 300},
                job_variables={"sbatch_args": ["--hold"] if queued else []})
            started = (lambda r: bool(r.infrastructure_pid)) if queued else \
                (lambda r: r.state_name == "Running" and out.exists())
            job_id = wait_run(client, run.id, started, log=log1).infrastructure_pid
            stop_worker(workers[0], signal.SIGKILL)
            # As if it had died before the id reached Prefect (the client's update_flow_run
            # skips an empty pid, so through the REST API).
            client.request("PATCH", "/flow_runs/{id}", path_params={"id": run.id},
                           json={"infrastructure_pid": None})
            left = client.read_flow_run(run.id)
            assert not left.infrastructure_pid
            assert left.state.type.value == ("PENDING" if queued else "RUNNING")
            assert provider.status(_job(job_id)).state is \
                (JobState.PENDING if queued else JobState.RUNNING)

            workers.append(start_worker(pool, prefect_api, log2,
                                        {"CLUSTERFLOW_SLURM_PENDING_GRACE_SECONDS": "0"}))
            # Adopted even with no grace at all: Slurm has its job.
            wait_log(log2, f"adopting flow run {run.name} ({left.state_name}, no job id "
                     f"recorded): Slurm job {job_id}")
            assert wait_run(client, run.id, lambda r: bool(r.infrastructure_pid),
                            log=log2).infrastructure_pid == job_id
            if queued:
                subprocess.run(["scontrol", "release", job_id], env=provider.env(),
                               check=True, timeout=60, capture_output=True)
                done = wait_run(client, run.id, lambda r: r.state.is_final(), log=log2)
                assert done.state_name == "Completed", done.state.message
            else:  # watched as its own: a cancel reaches scancel
                assert provider.status(_job(job_id)).state is JobState.RUNNING
                done = _cancel_reaches_scancel(client, provider, run.id, job_id, log2)
            assert done.infrastructure_pid == job_id
            assert _executions(out) == [{"job": job_id}]
            assert _completion_log(provider, job_name(run.id), job_id) == [job_id]
            assert not [s for s in client.read_flow_run_states(run.id)
                        if s.type.value == "SCHEDULED" and s.message
                        and s.message.startswith("rescheduled")]
        finally:
            _clean_up(workers, provider, job_id)


def test_a_live_worker_takes_over_a_dead_peers_run_and_leaves_a_live_ones(
        local_slurm, prefect_api, tmp_path):
    conf = local_slurm.layout.conf
    provider = SlurmProvider(slurm_conf=conf)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    workers: list[subprocess.Popen[bytes]] = []
    job_id = None
    with temporary_settings({PREFECT_API_URL: prefect_api}), \
            get_client(sync_client=True) as client:
        pool, deployment = _setup(client, tmp_path, conf, "peer")
        out = tmp_path / "out.jsonl"
        try:
            workers.append(start_worker(pool, prefect_api, log_a))
            a = worker_name(log_a)
            run = client.create_flow_run_from_deployment(
                deployment, parameters={"out": str(out), "sleep": 300})
            run = wait_run(client, run.id, lambda r: r.state_name == "Running"
                           and out.exists(), log=log_a)
            job_id = run.infrastructure_pid
            assert run.labels[WORKER_LABEL] == a
            workers.append(start_worker(pool, prefect_api, log_b))
            b = worker_name(log_b)
            time.sleep(8)  # several sweeps of b, and of a, while both live
            assert f"adopting flow run {run.name}" not in log_b.read_text()
            assert client.read_flow_run(run.id).labels[WORKER_LABEL] == a

            stop_worker(workers[0], signal.SIGKILL)  # b is not restarted
            wait_log(log_b, f"adopting flow run {run.name} (Running): Slurm job {job_id}, "
                     f"left by worker {a}, which stopped", timeout=60)
            assert wait_run(client, run.id, lambda r: r.labels.get(WORKER_LABEL) == b,
                            timeout=30, log=log_b)
            assert provider.status(_job(job_id)).state is JobState.RUNNING

            _cancel_reaches_scancel(client, provider, run.id, job_id, log_b)
            assert _executions(out) == [{"job": job_id}]
        finally:
            _clean_up(workers, provider, job_id)


def test_a_worker_restarted_under_its_name_takes_its_runs_back_beside_a_live_peer(
        local_slurm, prefect_api, tmp_path):
    """The peer sorts first, so it is the one that sweeps; but the run's label names a
    worker that heartbeats again (the restarted one), so the peer must leave it, and the
    restarted worker must take it back itself."""
    conf = local_slurm.layout.conf
    provider = SlurmProvider(slurm_conf=conf)
    log_a, log_a2, log_p = tmp_path / "a.log", tmp_path / "a2.log", tmp_path / "peer.log"
    workers: list[subprocess.Popen[bytes]] = []
    job_id = None
    with temporary_settings({PREFECT_API_URL: prefect_api}), \
            get_client(sync_client=True) as client:
        pool, deployment = _setup(client, tmp_path, conf, "same-name")
        out = tmp_path / "out.jsonl"
        try:
            # Its 30 s heartbeat keeps its name live for 90 s after the kill: the restart
            # comes well within that, as a restart by systemd would.
            workers.append(start_worker(pool, prefect_api, log_a, name="zz-login1",
                                        env={"PREFECT_WORKER_HEARTBEAT_SECONDS": "30"}))
            run = client.create_flow_run_from_deployment(
                deployment, parameters={"out": str(out), "sleep": 300})
            run = wait_run(client, run.id, lambda r: r.state_name == "Running"
                           and out.exists(), log=log_a)
            job_id = run.infrastructure_pid
            workers.append(start_worker(pool, prefect_api, log_p, name="aa-peer"))
            worker_name(log_p)
            stop_worker(workers[0], signal.SIGKILL)
            workers.append(start_worker(pool, prefect_api, log_a2, name="zz-login1"))
            wait_log(log_a2, f"adopting flow run {run.name} (Running): Slurm job {job_id}",
                     timeout=60)
            time.sleep(6)  # more sweeps of the peer: it must not take the run too
            assert f"adopting flow run {run.name}" not in log_p.read_text()

            _cancel_reaches_scancel(client, provider, run.id, job_id, log_a2)
            assert _executions(out) == [{"job": job_id}]
        finally:
            _clean_up(workers, provider, job_id)
