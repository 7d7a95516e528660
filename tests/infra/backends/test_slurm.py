"""The slurm backend against a real Slurm (Debian's 22.05): the one ``make slurm`` runs.

The session fixture runs ``python -m infra.clusters.slurm_local up`` (installing Slurm when
root and it is missing), so these tests never skip: without a Slurm they fail with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from infra.backends.launchers import MpiexecLauncher, SrunLauncher, python_module
from infra.backends.providers.base import JobHandle, JobState
from infra.backends.providers.local import LocalProvider
from infra.backends.providers.polling import Backoff, wait
from infra.backends.providers.slurm import (
    SlurmError,
    SlurmProvider,
    SlurmUnavailable,
    _exit_code,
    _status,
    valid_time_limit,
)
from infra.clusters.slurm_local.cluster import LocalSlurm
from infra.clusters.slurm_local.install import install
from infra.clusters.slurm_local.layout import LocalSlurmError
from mpi_jobs.heat import FAIL_RANK_ENV, reference_solution
from tests.slurm_fixtures import REPO, ensure_local_slurm
from tests.slurm_fixtures import run_up as _up

JOB_TIMEOUT = 60.0
FAST = Backoff(first=0.05, factor=1.5, cap=0.5)


@pytest.fixture(scope="session")
def cluster() -> LocalSlurm:
    return ensure_local_slurm()


@pytest.fixture
def provider(cluster: LocalSlurm) -> SlurmProvider:
    return SlurmProvider(slurm_conf=cluster.layout.conf)


def _processes_with(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (a per-test path): the job's ranks."""
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or [])]


def _heat_job(provider: SlurmProvider, tmp_path: Path, launcher: object, *, steps: int,
              env: dict[str, str] | None = None, name: str = "heat",
              ) -> tuple[JobHandle, Path, np.ndarray]:
    u0 = np.random.default_rng(7).random((33, 41))
    np.save(tmp_path / "u0.npy", u0)
    out = tmp_path / f"out-{name}"
    argv = python_module("mpi_jobs.heat", "--nx", "41", "--ny", "33", "--steps", str(steps),
                         "--alpha", "0.2", "--in", str(tmp_path / "u0.npy"), "--out", str(out))
    command = launcher.command(2, argv)  # type: ignore[attr-defined]
    job = provider.submit(command, ranks=2, job_name=name, workdir=tmp_path / "work",
                          env={"PYTHONPATH": str(REPO), **(env or {})})
    return job, out, u0


# --------------------------------------------------------------------------- the cluster


def test_up_twice_is_idempotent(cluster: LocalSlurm) -> None:
    before = cluster.status()
    assert before["up"], before
    proc = _up("--state-dir", str(cluster.layout.root))
    assert proc.returncode == 0, proc.stderr
    assert "already running" in proc.stderr, proc.stderr
    after = cluster.status()
    assert after["up"] and after["daemons"] == before["daemons"]
    status = subprocess.run([sys.executable, "-m", "infra.clusters.slurm_local", "status",
                             "--state-dir", str(cluster.layout.root)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["node"]["state"] in ("idle", "mixed", "allocated")
    assert shown["env"] == {"SLURM_CONF": str(cluster.layout.conf)}


# --------------------------------------------------------------------------- jobs


@pytest.mark.parametrize("launcher", [SrunLauncher(), MpiexecLauncher(oversubscribe=False)],
                         ids=["srun", "mpiexec"])
def test_heat_through_sbatch_is_bitwise_the_reference(provider: SlurmProvider, tmp_path: Path,
                                                      launcher: object) -> None:
    job, out, u0 = _heat_job(provider, tmp_path, launcher, steps=40)
    status = wait(provider, job, timeout=JOB_TIMEOUT, backoff=FAST)
    assert status.state is JobState.COMPLETED, (status, job.stderr.read_text())
    assert status.exit_code == 0
    assert np.array_equal(np.load(out / "field.npy"), reference_solution(u0, 40, 0.2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ranks"] == 2
    script = (tmp_path / "work" / "heat.sbatch").read_text()
    assert "sbatch --parsable" in script and "--ntasks=2" in script
    assert job.stdout == tmp_path / "work" / "heat.out"


def test_stdout_and_stderr_land_in_the_handle_paths(provider: SlurmProvider,
                                                    tmp_path: Path) -> None:
    command = ["sh", "-c", 'echo "out $SLURM_JOB_ID $SLURM_NTASKS $GREETING"; echo "err line" >&2']
    workdir = tmp_path / "odd dir %j"  # a space, and what would be sbatch's %j pattern
    job = provider.submit(command, ranks=1, job_name="echo", workdir=workdir,
                          env={"GREETING": "hello world"})
    assert job.stdout == workdir / "echo.out"
    assert job.stdout.exists() and job.stderr.exists()  # readable before the job starts
    status = wait(provider, job, timeout=JOB_TIMEOUT, backoff=FAST)
    assert status.state is JobState.COMPLETED, status
    assert job.stdout.read_text() == f"out {job.job_id} 1 hello world\n"
    assert job.stderr.read_text() == "err line\n"
    # The job completion log (what status falls back to once the controller forgets a job)
    # tells the same story.
    final = provider.completion_status(job)
    assert final is not None and final.state is JobState.COMPLETED and final.exit_code == 0


def test_tasks_that_never_launch_fail_the_job_though_srun_exits_0(
        provider: SlurmProvider, tmp_path: Path) -> None:
    # slurmd cannot open the step's per-task output file, so no task starts: srun prints
    # "task N launch failed" and exits 0 (Slurm 22.05). Unguarded, the job reads COMPLETED
    # with nothing run; under the guard it fails with 126 and says why.
    unlaunchable = ("--output", str(tmp_path / "no-such-dir" / "task-%t.out"))
    outcomes = {}
    for guard in (False, True):
        launcher = SrunLauncher(extra_args=unlaunchable, guard=guard)
        job, out, _ = _heat_job(provider, tmp_path, launcher, steps=10, name=f"g{int(guard)}")
        outcomes[guard] = (wait(provider, job, timeout=JOB_TIMEOUT, backoff=FAST), job, out)
    bare, _, out = outcomes[False]
    assert bare.state is JobState.COMPLETED and not out.exists(), bare  # why the guard exists
    guarded, job, out = outcomes[True]
    assert guarded.state is JobState.FAILED and guarded.exit_code == 126, guarded
    assert not out.exists()
    err = job.stderr.read_text()
    assert "task 0 launch failed" in err and "srun exited 0 but 2 task launch(es) failed" in err


def test_a_pmix_directory_left_in_tmp_by_another_cluster_does_not_break_a_launch(
        cluster: LocalSlurm, provider: SlurmProvider, tmp_path: Path) -> None:
    # Every fresh local cluster numbers its jobs from 1, and Slurm's PMIx plugin leaves
    # /tmp/spmix_appdir_<uid>_<job>.<step> behind when a step dies mid-launch; the next
    # cluster's job of that number then failed to launch ("File exists"). This cluster keeps
    # those directories in its own folder (mpi.conf), so leftovers in /tmp are not in the way.
    assert cluster.layout.mpi_conf.read_text().splitlines()[-1] == \
        f"PMIxCliTmpDirBase={cluster.layout.pmix_tmp}"
    assert cluster.layout.pmix_tmp.is_dir()
    probe = provider.submit(["true"], ranks=1, job_name="probe", workdir=tmp_path / "p")
    wait(provider, probe, timeout=JOB_TIMEOUT, backoff=FAST)
    nxt = int(probe.job_id) + 1
    leftovers = [Path(f"/tmp/spmix_appdir_{os.geteuid()}_{j}.0") for j in range(nxt, nxt + 4)]
    made = [p for p in leftovers if not p.exists()]
    for p in made:
        p.mkdir()
    try:
        job, out, u0 = _heat_job(provider, tmp_path, SrunLauncher(), steps=10)
        status = wait(provider, job, timeout=JOB_TIMEOUT, backoff=FAST)
    finally:
        for p in made:
            p.rmdir()
    assert int(job.job_id) in range(nxt, nxt + 4), job.job_id
    assert status.state is JobState.COMPLETED, (status, job.stderr.read_text())
    assert np.array_equal(np.load(out / "field.npy"), reference_solution(u0, 10, 0.2))


@pytest.mark.parametrize("launcher", [SrunLauncher(), MpiexecLauncher(oversubscribe=False)],
                         ids=["srun", "mpiexec"])
def test_failing_rank_fails_the_job_with_its_message(provider: SlurmProvider, tmp_path: Path,
                                                     launcher: object) -> None:
    job, out, _ = _heat_job(provider, tmp_path, launcher, steps=100_000,
                            env={FAIL_RANK_ENV: "1"})
    status = wait(provider, job, timeout=JOB_TIMEOUT, backoff=FAST)
    assert status.state is JobState.FAILED, status
    assert status.exit_code not in (0, None) and "exit code" in status.message
    stderr = job.stderr.read_text()
    assert "heat: rank 1: RuntimeError: injected failure" in stderr, stderr
    assert not (out / "field.npy").exists()
    assert _processes_with(str(out)) == []
    final = provider.completion_status(job)
    assert final is not None and final.state is JobState.FAILED


def test_cancel_stops_every_rank(provider: SlurmProvider, tmp_path: Path) -> None:
    job, out, _ = _heat_job(provider, tmp_path, provider.launcher(), steps=10**9, name="long")
    deadline = time.monotonic() + JOB_TIMEOUT
    # Running as far as Slurm is concerned, and both ranks really started.
    while (provider.status(job).state is not JobState.RUNNING
           or len([p for p in _processes_with(str(out)) if _is_rank(p)]) < 2):
        assert time.monotonic() < deadline, (provider.status(job), job.stderr.read_text())
        time.sleep(0.05)
    provider.cancel(job)
    status = provider.status(job)
    assert status.state is JobState.CANCELLED, status
    queued = subprocess.run(["squeue", "-h", "-j", job.job_id], env=provider.env(),
                            capture_output=True, text=True, timeout=30)
    assert queued.returncode == 0 and queued.stdout.strip() == ""
    assert _processes_with(str(out)) == []
    provider.cancel(job)  # cancelling a finished job is a no-op, not an error


def _is_rank(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return Path(argv[0].decode()).name.startswith("python")


def test_more_ranks_than_cpus_is_refused_unless_overcommitted(cluster: LocalSlurm,
                                                              tmp_path: Path) -> None:
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%c"], env={**os.environ, **cluster.env()},
                           capture_output=True, text=True, timeout=30)
    ranks = int(sinfo.stdout.split()[0]) + 1
    strict = SlurmProvider(slurm_conf=cluster.layout.conf)
    with pytest.raises(SlurmError) as err:
        strict.submit(["true"], ranks=ranks, job_name="big", workdir=tmp_path)
    assert f"{ranks} ranks do not fit the cluster" in str(err.value)
    assert "overcommit" in str(err.value)

    shared = SlurmProvider(slurm_conf=cluster.layout.conf, overcommit=True)
    u0 = np.random.default_rng(3).random((17, 13))
    np.save(tmp_path / "u0.npy", u0)
    argv = python_module("mpi_jobs.heat", "--nx", "13", "--ny", "17", "--steps", "9",
                         "--in", str(tmp_path / "u0.npy"), "--out", str(tmp_path / "out"))
    job = shared.submit(shared.launcher().command(ranks, argv), ranks=ranks, job_name="big",
                        workdir=tmp_path, env={"PYTHONPATH": str(REPO)})
    status = wait(shared, job, timeout=JOB_TIMEOUT, backoff=FAST)
    assert status.state is JobState.COMPLETED, (status, job.stderr.read_text())
    assert np.array_equal(np.load(tmp_path / "out" / "field.npy"), reference_solution(u0, 9, 0.2))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["ranks"] == ranks


def test_unknown_partition_lists_the_real_ones(cluster: LocalSlurm, tmp_path: Path) -> None:
    provider = SlurmProvider(slurm_conf=cluster.layout.conf, partition="nope")
    with pytest.raises(SlurmError, match=r"Partitions: local"):
        provider.submit(["true"], ranks=1, job_name="p", workdir=tmp_path)


# --------------------------------------------------------------------------- not answering


def test_installing_without_root_says_what_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LocalSlurmError) as err:
        install(["slurmctld", "munge"])
    assert "needs root" in str(err.value)
    assert "sudo apt-get install -y --no-install-recommends slurmctld" in str(err.value)


def test_missing_local_slurm_says_run_make_slurm(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTERFLOW_HOME", str(tmp_path))
    provider = SlurmProvider(slurm_conf=tmp_path / "slurm" / "slurm.conf")
    t0 = time.monotonic()
    with pytest.raises(SlurmUnavailable, match=r"run `make slurm`"):
        provider.submit(["true"], ranks=1, job_name="x", workdir=tmp_path / "w")
    assert time.monotonic() - t0 < 10  # not Slurm's own minute of retries


def test_controller_that_does_not_answer_is_reported(cluster: LocalSlurm, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "slurm.conf"
    conf.write_text("\n".join(
        f"SlurmctldPort={port}" if line.startswith("SlurmctldPort=") else line
        for line in cluster.layout.conf.read_text().splitlines()) + "\n")
    provider = SlurmProvider(slurm_conf=conf)
    with pytest.raises(SlurmUnavailable) as err:
        provider.submit(["true"], ranks=1, job_name="x", workdir=tmp_path / "w")
    assert "does not answer" in str(err.value) and str(conf) in str(err.value)


# --------------------------------------------------------------------------- recovery


def test_up_restarts_daemons_that_died(cluster: LocalSlurm, provider: SlurmProvider,
                                       tmp_path: Path) -> None:
    old = {d: cluster.pid(d) for d in ("munged", "slurmd")}
    for pid in old.values():
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # a crash: stale pid files and munge socket stay behind
    deadline = time.monotonic() + 10
    while any(cluster.pid(d) for d in old) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc = _up("--state-dir", str(cluster.layout.root))
    assert proc.returncode == 0, proc.stderr
    assert "started munged" in proc.stderr and "started slurmd" in proc.stderr, proc.stderr
    assert all(cluster.pid(d) not in (None, old[d]) for d in old)
    job = provider.submit(["true"], ranks=1, job_name="after", workdir=tmp_path)
    assert wait(provider, job, timeout=JOB_TIMEOUT, backoff=FAST).state is JobState.COMPLETED


def test_second_cluster_with_its_own_state_save_location(cluster: LocalSlurm,
                                                          tmp_path: Path) -> None:
    """What a head-node failover drill needs: an instance whose controller state lives on a
    volume of its own, next to (not instead of) the default one."""
    shared = tmp_path / "shared-volume" / "slurmctld"
    other = LocalSlurm(tmp_path / "c2", state_save_location=shared)
    try:
        done = other.up(install_missing=False, timeout=60)
        assert done["started"] == ["munged", "slurmctld", "slurmd"]
        info = other.status()
        assert info["up"] and info["state_save_location"] == str(shared)
        assert info["ports"] != cluster.status()["ports"]
        provider = SlurmProvider(slurm_conf=other.layout.conf)
        job = provider.submit(["sh", "-c", "echo on c2"], ranks=1, job_name="c2",
                              workdir=tmp_path / "w")
        assert wait(provider, job, timeout=JOB_TIMEOUT, backoff=FAST).state \
            is JobState.COMPLETED
        assert job.stdout.read_text() == "on c2\n"
        assert list(shared.glob(f"hash.*/job.{job.job_id}"))  # the job's record is on the volume
        assert other.up(install_missing=False)["started"] == []
    finally:
        stopped = other.down()
    assert stopped == ["slurmd", "slurmctld", "munged"]
    assert not other.layout.munge_socket_dir.exists()
    assert not other.status()["up"]
    assert cluster.status()["up"]  # the default cluster was not touched


def _recorded_with_ports(state_dir: Path, ports: dict[str, int]) -> LocalSlurm:
    """A not yet started cluster whose recorded settings name ``ports``."""
    cluster = LocalSlurm(state_dir)
    cluster.layout.root.mkdir(parents=True)
    cluster._save_settings(cluster.settings().model_copy(update={  # noqa: SLF001
        "ctld_port": ports["slurmctld"], "slurmd_port": ports["slurmd"]}))
    return cluster


def test_a_cluster_whose_ports_were_taken_meanwhile_moves(cluster: LocalSlurm,
                                                          tmp_path: Path) -> None:
    """Two state dirs set up while neither ran both got Slurm's default ports; the second to
    come up must move, not die on slurmd's "Address already in use"."""
    taken = cluster.status()["ports"]
    other = _recorded_with_ports(tmp_path / "c3", taken)
    try:
        done = other.up(install_missing=False, timeout=60)
        assert done["ports_moved_from"] == [taken["slurmctld"], taken["slurmd"]]
        ports = other.status()["ports"]
        assert other.status()["up"] and set(ports.values()).isdisjoint(taken.values())
        # Recorded: the next `up` keeps the new ports and changes nothing.
        again = other.up(install_missing=False)
        assert again["ports_moved_from"] is None and not again["config_changed"]
    finally:
        other.down()
    assert cluster.status()["up"] and cluster.status()["ports"] == taken


def test_a_lost_pid_file_is_refused_not_doubled(cluster: LocalSlurm, tmp_path: Path) -> None:
    """Moving ports while our own controller still runs (its pid file lost) would start a
    second controller on the same state: refused, naming the process."""
    taken = cluster.status()["ports"]
    other = _recorded_with_ports(tmp_path / "c5", taken)
    # A process that looks like c5's slurmctld: named slurmctld, its config on the command line.
    fake = tmp_path / "bin" / "slurmctld"
    fake.parent.mkdir()
    shutil.copy("/bin/sh", fake)
    stray = subprocess.Popen([str(fake), "-c", "sleep 60", str(other.layout.conf)])
    try:
        with pytest.raises(LocalSlurmError, match=f"runs as pid {stray.pid} but"):
            other.up(install_missing=False, timeout=30)
        assert other.pid("slurmctld") is None and other.pid("slurmd") is None
    finally:
        stray.kill()
        stray.wait()
        other.down()


# --------------------------------------------------------------------------- mapping, polling


@pytest.mark.parametrize(("state", "code", "expected"), [
    ("PENDING", "0:0", JobState.PENDING),
    ("CONFIGURING", "0:0", JobState.PENDING),
    ("RUNNING", "0:0", JobState.RUNNING),
    ("COMPLETING", "0:0", JobState.RUNNING),
    ("COMPLETED", "0:0", JobState.COMPLETED),
    ("CANCELLED", "0:15", JobState.CANCELLED),
    ("CANCELLED+", "0:15", JobState.CANCELLED),  # sacct's "by someone" marker
    ("FAILED", "3:0", JobState.FAILED),
    ("TIMEOUT", "0:0", JobState.FAILED),
    ("OUT_OF_MEMORY", "0:125", JobState.FAILED),
    ("NODE_FAIL", "0:0", JobState.FAILED),
])
def test_slurm_states_map_to_the_contract(state: str, code: str, expected: JobState) -> None:
    assert _status(state, _exit_code(code)).state is expected


def test_exit_codes_and_time_limits() -> None:
    assert _exit_code("3:0") == 3 and _exit_code("0:9") == -9 and _exit_code("bad") is None
    assert all(valid_time_limit(t) for t in ("30", "1:00:00", "2-12", "1-00:00:00", "UNLIMITED"))
    assert not any(valid_time_limit(t) for t in ("1h", "", "1:2:3:4", "-5"))
    with pytest.raises(ValueError, match="not a Slurm time"):
        SlurmProvider(time_limit="1h")


def test_wait_returns_the_terminal_status_and_reports_each_poll(tmp_path: Path) -> None:
    provider = LocalProvider()
    # The job holds until the first poll has been seen, so that poll must find it running.
    release = tmp_path / "release"
    job = provider.submit(["sh", "-c", f"echo a; while [ ! -e {release} ]; do sleep 0.05; "
                                       "done; echo b"], ranks=1, job_name="w", workdir=tmp_path)
    seen = []

    def on_poll(s: Any) -> None:
        seen.append(s.state)
        release.touch()

    status = wait(provider, job, timeout=60, backoff=FAST, on_poll=on_poll)
    assert status.state is JobState.COMPLETED
    assert seen[0] is JobState.RUNNING and seen[-1] is JobState.COMPLETED
    assert job.stdout.read_text() == "a\nb\n"

    slow = provider.submit(["sleep", "30"], ranks=1, job_name="slow", workdir=tmp_path)
    with pytest.raises(TimeoutError, match="left running"):
        wait(provider, slow, timeout=0.3, backoff=FAST)
    assert provider.status(slow).state is JobState.RUNNING
    provider.cancel(slow)
