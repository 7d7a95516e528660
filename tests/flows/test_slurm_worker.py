"""The ``clusterflow-slurm`` work pool: a real ``prefect worker start --type clusterflow-slurm``
against the session's Prefect server, submitting deployments' flow runs to the local Slurm.

A flow run must run *inside* its Slurm job (it records ``SLURM_JOB_ID`` and the task count
the pool's template gave it), report that job id as its infrastructure pid, and end in the
job completion log; cancelling a running flow run through the API must reach ``scancel``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling

from flows.slurm_worker import SlurmWorker
from infra.backends.providers.base import JobHandle, JobState
from infra.backends.providers.polling import wait
from infra.backends.providers.slurm import SlurmProvider
from infra.clusters.slurm_local import LocalSlurm
from tests.conftest import BIN
from tests.slurm_fixtures import ensure_local_slurm

FLOW = '''
import json, os, pathlib, time
from prefect import flow

@flow
def where(out: str, sleep: float = 0.0) -> str:
    pathlib.Path(out).write_text(json.dumps({"job": os.environ.get("SLURM_JOB_ID"),
                                             "ntasks": os.environ.get("SLURM_NTASKS")}))
    time.sleep(sleep)
    return os.environ.get("SLURM_JOB_ID", "")
'''


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def _wait(client, flow_run_id, done, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(flow_run_id)
        if done(run):
            return run
        assert time.monotonic() < deadline, f"flow run stuck in {run.state_name}"
        time.sleep(0.5)


def test_slurm_pool_runs_a_deployment_and_cancel_reaches_scancel(
        local_slurm, prefect_api, tmp_path):
    conf = local_slurm.layout.conf
    project = tmp_path / "project"
    project.mkdir()
    (project / "where.py").write_text(FLOW)
    template = SlurmWorker.get_default_base_job_template()
    props = template["variables"]["properties"]
    props["slurm_conf"]["default"] = str(conf)
    props["working_dir"]["default"] = str(tmp_path / "jobs")
    props["time_limit"]["default"] = "10"
    pool = f"slurm-{os.getpid()}"
    provider = SlurmProvider(slurm_conf=conf)
    worker = None
    with temporary_settings({PREFECT_API_URL: prefect_api}), \
            get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="clusterflow-slurm",
                                               base_job_template=template))
        flow_id = client.create_flow_from_name("where")
        deployment = client.create_deployment(
            flow_id=flow_id, name="on-slurm", work_pool_name=pool, entrypoint="where.py:where",
            path=str(project), job_variables={"tasks": 2},
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {
                "directory": str(project)}}])
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type",
             "clusterflow-slurm"], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PREFECT_API_URL": prefect_api,
                 "PREFECT_WORKER_QUERY_SECONDS": "1"}, start_new_session=True)
        try:
            out = tmp_path / "first.json"
            run = client.create_flow_run_from_deployment(deployment,
                                                         parameters={"out": str(out)})
            run = _wait(client, run.id, lambda r: r.state and r.state.is_final())
            assert run.state_name == "Completed", (tmp_path / "worker.log").read_text()[-3000:]
            job_id = run.infrastructure_pid
            assert job_id and job_id.isdigit()
            # It ran inside that job, with the template's task count.
            assert json.loads(out.read_text()) == {"job": job_id, "ntasks": "2"}
            # The engine reports Completed just before the job's process exits.
            done = wait(provider, JobHandle(job_id, Path(), Path()), timeout=60)
            assert done.state is JobState.COMPLETED
            sacct = subprocess.run(["sacct", "-c", "-n", "-P", "-j", job_id, "-o",
                                    "jobid,state"], env=provider.env(), capture_output=True,
                                   text=True, timeout=60)
            deadline = time.monotonic() + 30  # the completion log is written as the job ends
            while f"{job_id}|COMPLETED" not in sacct.stdout and time.monotonic() < deadline:
                time.sleep(0.5)
                sacct = subprocess.run(sacct.args, env=provider.env(), capture_output=True,
                                       text=True, timeout=60)
            assert f"{job_id}|COMPLETED" in sacct.stdout, sacct.stdout + sacct.stderr

            # Cancel a running flow run through the API: the job must be scancel'ed.
            out2 = tmp_path / "second.json"
            run = client.create_flow_run_from_deployment(
                deployment, parameters={"out": str(out2), "sleep": 300})
            _wait(client, run.id, lambda r: r.state_name == "Running" and out2.exists())
            job_id = client.read_flow_run(run.id).infrastructure_pid
            assert json.loads(out2.read_text())["job"] == job_id
            client.set_flow_run_state(run.id, Cancelling(), force=True)
            ended = wait(provider, JobHandle(job_id, Path(), Path()), timeout=120)
            assert ended.state is JobState.CANCELLED
            run = _wait(client, run.id, lambda r: r.state_name == "Cancelled", timeout=60)
            time.sleep(3)  # the killed engine's last word must not undo the cancel
            assert client.read_flow_run(run.id).state_name == "Cancelled"
            assert f"scancel {job_id}" in (tmp_path / "worker.log").read_text()
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=10)
