"""A Spot reclaim of ONE point of a sweep's job array, on the real local Slurm.

``scontrol requeue ARRAYID_INDEX`` mid-run is what Slurm does to an array task whose node is
lost when the array was submitted with ``--requeue``: that element's batch script is killed
and started again (its own ``SLURM_RESTART_COUNT`` one higher) while the other elements run
on. The reclaimed point must resume from its newest checkpoint, end bitwise equal to an
uninterrupted run, and be counted on its own; the bound applies per point.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from infra.backends.launchers import python_module
from infra.backends.providers.base import JobHandle, JobState
from infra.backends.providers.slurm import ArrayItem, SlurmProvider
from infra.clusters.slurm_local.cluster import LocalSlurm
from mpi_jobs.catalog import KERNELS, HeatParameters
from tests.slurm_fixtures import ensure_local_slurm

REPO = Path(__file__).resolve().parents[3]
HEAT = KERNELS["heat"]
# Two points of a sweep over alpha: different fields, so a mixed-up element would show.
POINTS = {0: HeatParameters(nx=192, ny=192, steps=800, diag_every=0, alpha=0.10),
          1: HeatParameters(nx=192, ny=192, steps=800, diag_every=0, alpha=0.20)}
EVERY = 100
# Each step sleeps this long (``mpi_jobs.runtime.step_delay``), so a job lasts seconds, not
# the fraction of a second a fast heat update takes: the reclaim must hit it while it runs.
# Without it, on a quiet machine the job could finish before the reclaim, and Slurm also
# requeues a finished batch job, so the test saw a "resume" of a job that had completed.
SLOW = {"CLUSTERFLOW_STEP_DELAY_SECONDS": "0.01"}


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _newest_step(ck: Path) -> int:
    done = [json.loads(c.read_text())["step"] for c in ck.glob("*/COMPLETE.json")]
    return max(done, default=0)


def assert_running(job_id: str, env: dict[str, str]) -> str:
    """The job's ``scontrol show job -o`` line, once it is known to be RUNNING: a reclaim of
    a job that already finished would prove nothing (Slurm requeues finished jobs too)."""
    show = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                          text=True, env=env).stdout
    assert "JobState=RUNNING" in show, (
        f"job {job_id} is not running at the reclaim (make it longer with {SLOW}): {show}")
    return show


def reclaim(job_id: str, env: dict[str, str], timeout: float = 60) -> None:
    """``scontrol requeue`` (the reclaim), then let the job start again at once.

    Slurm holds a requeued job for about two minutes (``EligibleTime`` = requeue + 121 s,
    shown as ``Reason=BeginTime``); on a real cluster a reclaimed Spot node takes about as
    long to be replaced. Once the job is pending again, ``StartTime=now`` lifts the hold so
    the test does not sit through it. Not at once, though: slurmd refuses a job credential
    issued in the same second the old attempt's was revoked ("Killing non-startable batch
    job: Job credential revoked", the job then FAILS), which is what the hold guards against.
    """
    assert_running(job_id, env)
    got = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                         env=env)
    assert got.returncode == 0, got.stderr
    requeued = time.monotonic()
    deadline = time.monotonic() + timeout
    while "JobState=PENDING" not in (show := subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
            env=env).stdout):
        assert time.monotonic() < deadline, show
        time.sleep(0.2)
    assert "Restarts=" in show and "Restarts=0 " not in show, show
    time.sleep(max(0.0, requeued + 2.5 - time.monotonic()))
    got = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                         capture_output=True, text=True, env=env)
    assert got.returncode == 0, got.stderr


def reclaim_node(job_id: str, env: dict[str, str], timeout: float = 60) -> None:
    """The node under the job goes DOWN (what ParallelCluster does to a reclaimed Spot
    node): Slurm kills every job on it and requeues the requeue-able ones. The node is then
    back (the local slurmd re-registers at once, else it is resumed) and the hold is lifted
    as in ``reclaim``."""
    def show() -> str:
        return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                              text=True, env=env).stdout

    node = assert_running(job_id, env).split(" NodeList=")[1].split()[0]
    got = subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN",
                          "Reason=clusterflow test: spot reclaim"], capture_output=True,
                         text=True, env=env)
    assert got.returncode == 0, got.stderr
    lost = time.monotonic()
    deadline = lost + timeout
    while "JobState=PENDING" not in (text := show()):
        assert time.monotonic() < deadline, text
        time.sleep(0.2)
    assert "Restarts=1" in text, text

    def node_state() -> str:
        return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True,
                              text=True, env=env).stdout.strip()

    # slurmd may re-register (and so resume the node) between the look and the RESUME, which
    # then fails as an invalid transition: only a node still down afterwards is an error.
    while node_state().startswith("down"):
        got = subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"],
                             capture_output=True, text=True, env=env)
        assert got.returncode == 0 or not node_state().startswith("down"), got.stderr
        assert time.monotonic() < deadline, f"node {node} still down: {node_state()}"
        time.sleep(0.2)
    time.sleep(max(0.0, lost + 2.5 - time.monotonic()))
    got = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                         capture_output=True, text=True, env=env)
    assert got.returncode == 0, got.stderr


def _items(work: Path) -> list[ArrayItem]:
    items = []
    for index, params in POINTS.items():
        point = work / f"p{index}"
        point.mkdir(parents=True)
        HEAT.make_input(params, point / "in.npy")
        argv = python_module(HEAT.module, *HEAT.argv(
            params, point / "in.npy", point / "out", checkpoint_dir=point / "ck",
            checkpoint_every=EVERY, restart=True))
        items.append(ArrayItem(index, argv, point, {"PYTHONPATH": str(REPO), **SLOW}))
    return items


Sweep = tuple[SlurmProvider, dict[int, JobHandle], dict[int, JobState]]


def _sweep(work: Path, *, reclaim_index: int | None, at_step: int = 300,
           max_interruptions: int = 2, timeout: float = 300) -> Sweep:
    """Both points as one requeue-able job array; ``scontrol requeue ARRAY_<index>`` once
    that point has a complete checkpoint at or past ``at_step``."""
    provider = SlurmProvider(launcher="mpiexec", overcommit=True, requeue=True,
                             max_interruptions=max_interruptions)
    items = _items(work)
    launch = provider.launcher()
    items = [ArrayItem(i.index, launch.command(2, i.command), i.workdir, i.env) for i in items]
    handles = dict(zip(POINTS, provider.submit_array(items, ranks=2, job_name="sweep",
                                                     workdir=work, max_parallel=2),
                       strict=True))
    env = os.environ | {"SLURM_CONF": str(provider.slurm_conf)}
    deadline = time.monotonic() + timeout
    states: dict[int, JobState] = {}
    seen: list[str] = []  # how each element ended, for the assertion messages
    while len(states) < len(handles):
        if reclaim_index is not None and \
                _newest_step(work / f"p{reclaim_index}" / "ck") >= at_step:
            reclaim(handles[reclaim_index].job_id, env)
            reclaim_index = None
        for index, handle in handles.items():
            if index not in states and (st := provider.status(handle)).state.terminal:
                states[index] = st.state
                seen.append(f"{index}: {st.message}")
        assert time.monotonic() < deadline, f"array still running: {states}"
        time.sleep(0.2)
    for index, handle in handles.items():  # what went wrong, should a test fail
        seen.append(f"{index}: {handle.stdout.read_text()[-1500:]} "
                    f"{handle.stderr.read_text()[-1500:]}")
    print("\n".join(seen))
    return provider, handles, states


def test_a_reclaimed_array_point_resumes_bitwise_identical_and_is_counted_alone(
        local_slurm: LocalSlurm, tmp_path: Path) -> None:
    provider, handles, states = _sweep(tmp_path / "clean", reclaim_index=None)
    assert states == {0: JobState.COMPLETED, 1: JobState.COMPLETED}, \
        [h.stderr.read_text() for h in handles.values()]
    clean = {i: _sha(tmp_path / "clean" / f"p{i}" / "out" / "field.npy") for i in POINTS}
    assert clean[0] != clean[1]
    assert all(provider.interruptions(h).count == 0 for h in handles.values())

    provider, handles, states = _sweep(tmp_path / "hit", reclaim_index=1)
    assert states == {0: JobState.COMPLETED, 1: JobState.COMPLETED}, \
        [h.stderr.read_text() for h in handles.values()]
    hit = provider.interruptions(handles[1])
    assert hit.count == 1 and hit.seconds_lost > 0
    assert provider.interruptions(handles[0]).count == 0  # its sibling ran on untouched
    log = handles[1].stdout.read_text()
    restarted = [ln for ln in log.splitlines() if "restarting from step" in ln]
    assert restarted, log  # resumed, not started over
    assert int(restarted[-1].split("restarting from step ")[1].split()[0]) >= 300
    for i in POINTS:
        assert _sha(tmp_path / "hit" / f"p{i}" / "out" / "field.npy") == clean[i]


def test_an_array_point_past_max_interruptions_fails_alone(local_slurm: LocalSlurm,
                                                           tmp_path: Path) -> None:
    provider, handles, states = _sweep(tmp_path / "bounded", reclaim_index=0, at_step=200,
                                       max_interruptions=0)
    assert states == {0: JobState.FAILED, 1: JobState.COMPLETED}
    assert "interrupted 1 times, past max_interruptions=0" in handles[0].stderr.read_text()
    assert not (tmp_path / "bounded" / "p0" / "out" / "field.npy").exists()
    assert (tmp_path / "bounded" / "p1" / "out" / "field.npy").exists()


def test_the_array_script_asks_for_requeue_only_when_told(tmp_path: Path) -> None:
    """The sbatch line and guard, read from the script the provider writes (no Slurm)."""
    items = [ArrayItem(3, ["true"], tmp_path, {})]
    for requeue in (True, False):
        provider = SlurmProvider(requeue=requeue, max_interruptions=5,
                                 slurm_conf=tmp_path / "none.conf")
        with pytest.raises(Exception, match="does not exist"):  # no Slurm: stops at ping
            provider.submit_array(items, ranks=1, job_name="s", workdir=tmp_path,
                                  max_parallel=1)
        script = (tmp_path / "s.sbatch").read_text()
        assert ("--requeue" in script) is requeue
        assert ("past max_interruptions=5" in script) is requeue
        assert ('/"${SLURM_ARRAY_TASK_ID}.attempts"' in script) is requeue
