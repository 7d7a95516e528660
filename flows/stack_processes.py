"""The local stack's processes: started in their own session, recorded by pid and start time,
waited for, and stopped with their descendants.

Apart from ``flows.local_stack`` (which decides what the stack runs) because this is the
part that must never signal the wrong process: a recycled pid is recognised by its start
time, and ``down`` reaches flow runs and MPI ranks that made their own process groups.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 180.0


class StackError(RuntimeError):
    """The local stack cannot be started, stopped or inspected; the message says why."""


class Component(BaseModel):
    name: str
    pid: int
    create_time: float
    command: list[str]
    log: str
    url: str | None = None



def recorded_process(c: Component) -> psutil.Process | None:
    """The recorded process if it still runs (same pid *and* start time), else None."""
    try:
        p = psutil.Process(c.pid)
        if abs(p.create_time() - c.create_time) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.NoSuchProcess:
        return None


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reset_signals() -> None:
    # A parent started with `cmd &` hands down SIGINT ignored; Prefect's worker then also
    # ignores SIGTERM. Children get default handlers whatever their parent had.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def spawn(name: str, command: list[str], env: dict[str, str], log: Path,
           url: str | None = None) -> tuple[Component, subprocess.Popen[bytes]]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_reset_signals)
    return Component(name=name, pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(),
                     command=command, log=str(log), url=url), proc


def log_tail(path: str | Path, chars: int = 1500) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def healthy(url: str, timeout: float = 2.0, attempts: int = 1) -> bool:
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if attempt + 1 < attempts:
            time.sleep(0.5)
    return False


def wait_for(what: str, ready: Any, proc: subprocess.Popen[bytes], log: str,
              timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise StackError(f"{what} exited at start (code {proc.returncode}); its log "
                             f"{log} ends with:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} was not ready within {timeout:.0f} s; see {log}:\n"
                             f"{log_tail(log)}")
        time.sleep(0.25)


def stop_components(components: list[Component],
                    grace_s: float) -> tuple[list[int], list[int]]:
    """SIGTERM each component's process group and descendants; SIGKILL what outlives grace.

    Returns (signalled pids, pids that needed SIGKILL).
    """
    procs: dict[int, psutil.Process] = {}
    for c in components:
        root = recorded_process(c)
        if root is None:
            continue
        with contextlib.suppress(psutil.Error):
            for p in [root, *root.children(recursive=True)]:
                procs[p.pid] = p
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(c.pid, signal.SIGTERM)  # each was started as its own group leader
    for p in procs.values():  # descendants that made their own groups (flow runs)
        with contextlib.suppress(psutil.Error):
            p.terminate()
    deadline = time.monotonic() + grace_s
    while any(alive(p) for p in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = []
    for p in procs.values():
        if alive(p):
            killed.append(p.pid)
            with contextlib.suppress(psutil.Error):
                p.kill()
    me = os.getpid()
    for p in procs.values():  # reap our own children (on a failed `up`)
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if p.ppid() == me:
                p.wait(timeout=5)
    return sorted(procs), sorted(killed)
