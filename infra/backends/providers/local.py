"""The local provider: the job is a process group on this machine."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from infra.backends.launchers import MpiexecLauncher
from infra.backends.providers.base import ExecutionProvider, JobHandle, JobState, JobStatus
from infra.child_processes import die_with_parent


class LocalProvider(ExecutionProvider):
    """Ranks on this machine; oversubscribed, since correctness runs often want N > cores."""

    label = "local"

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def launcher(self) -> MpiexecLauncher:
        return MpiexecLauncher(oversubscribe=True)

    def submit(self, command: list[str], *, ranks: int, job_name: str, workdir: Path,
               env: dict[str, str] | None = None) -> JobHandle:
        workdir.mkdir(parents=True, exist_ok=True)
        out, err = workdir / f"{job_name}.out", workdir / f"{job_name}.err"
        with out.open("wb") as fo, err.open("wb") as fe:
            # Own session: cancel() can signal mpiexec and every rank it started at once.
            # SIGTERM on our death (even SIGKILL): mpiexec then stops its ranks itself.
            # Submitted from the thread that waits on the job, so it lives as long as the job.
            proc = subprocess.Popen(command, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                    cwd=workdir, env={**os.environ, **(env or {})},
                                    start_new_session=True, preexec_fn=die_with_parent())
        job_id = str(proc.pid)
        self._procs[job_id] = proc
        return JobHandle(job_id=job_id, stdout=out, stderr=err)

    def status(self, job: JobHandle) -> JobStatus:
        proc = self._procs[job.job_id]
        code = proc.poll()
        if code is None:
            return JobStatus(JobState.RUNNING)
        if code == 0:
            return JobStatus(JobState.COMPLETED, 0)
        if code < 0 and -code in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            return JobStatus(JobState.CANCELLED, code, f"killed by signal {-code}")
        return JobStatus(JobState.FAILED, code, f"exit code {code}")

    def pause(self, job: JobHandle, seconds: float) -> None:
        # Woken by the exit itself: the end of a short job is seen at once, not a poll later.
        try:
            self._procs[job.job_id].wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass

    def cancel(self, job: JobHandle) -> None:
        proc = self._procs[job.job_id]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
