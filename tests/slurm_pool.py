"""A ``clusterflow-slurm`` work pool on the session's Prefect server and the local Slurm, and
real ``prefect worker start`` processes for it: shared by the Slurm worker's tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.slurm_worker import SlurmWorker
from tests.conftest import BIN


def create_pool(client: Any, name: str, conf: Path, jobs: Path, **defaults: Any) -> str:
    """A pool whose template points at the local Slurm's config and writes under ``jobs``."""
    from prefect.client.schemas.actions import WorkPoolCreate

    template = SlurmWorker.get_default_base_job_template()
    props = template["variables"]["properties"]
    props["slurm_conf"]["default"] = str(conf)
    props["working_dir"]["default"] = str(jobs)
    props["time_limit"]["default"] = "10"
    for key, value in defaults.items():
        props[key]["default"] = value
    client.create_work_pool(WorkPoolCreate(name=name, type="clusterflow-slurm",
                                           base_job_template=template))
    return name


def start_worker(pool: str, api: str, log: Path, env: dict[str, str] | None = None,
                 name: str | None = None) -> subprocess.Popen[bytes]:
    """``prefect worker start --type clusterflow-slurm`` in a session of its own.

    It heartbeats and sweeps every 2 s (not 30 s and 60 s), so a killed worker counts as
    gone after 6 s and its runs are taken over within a test's patience."""
    return subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type",
         "clusterflow-slurm", *(["--name", name] if name else [])], stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1",
             "PREFECT_WORKER_HEARTBEAT_SECONDS": "2", "CLUSTERFLOW_SLURM_SWEEP_SECONDS": "2",
             **(env or {})}, start_new_session=True)


def worker_name(log: Path, timeout: float = 120) -> str:
    """The name a started worker gave itself (``Worker 'NAME' started!``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(r"Worker '([^']+)' started!", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if time.monotonic() > deadline:
            raise AssertionError(f"the worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def wait_log(log: Path, text: str, timeout: float = 120) -> str:
    """The worker's log once it contains ``text``."""
    deadline = time.monotonic() + timeout
    while text not in (seen := log.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never appeared in {log}:\n{seen[-3000:]}")
        time.sleep(0.3)
    return seen


def stop_worker(worker: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the worker's whole session (the worker and anything it started); wait."""
    try:
        os.killpg(worker.pid, sig)
    except ProcessLookupError:
        pass
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)


def wait_run(client: Any, flow_run_id: Any, done: Callable[[Any], bool],
             timeout: float = 240, log: Path | None = None) -> Any:
    """The flow run once ``done(run)``; fails with its state (and the worker's log)."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(flow_run_id)
        if done(run):
            return run
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"flow run stuck in {run.state_name}: "
                                 f"{run.state.message if run.state else ''}\n{tail}")
        time.sleep(0.5)
