"""Processes and ports of the local Slurm: run a command, tell our daemons from another Slurm's,
find free ports. Shared by the installer, the config writer and the daemon lifecycle."""

from __future__ import annotations

import os
import socket
import subprocess
import zlib
from pathlib import Path

import psutil

from infra.clusters.slurm_local.layout import DEFAULT_PORTS, LocalSlurmError


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 30,
         check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise LocalSlurmError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def _alive(pid: int) -> bool:
    try:
        # A daemon reparented to a PID 1 that does not reap leaves a zombie behind: that is dead.
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _is_ours(proc: psutil.Process, daemon: str, marker: str) -> bool:
    try:
        return (proc.name() == daemon and marker in " ".join(proc.cmdline())
                and proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD))
    except psutil.Error:
        return False


def _ours(pid: int, daemon: str, marker: str) -> bool:
    try:
        return _is_ours(psutil.Process(pid), daemon, marker)
    except psutil.Error:
        return False


def _orphans(daemon: str, marker: str, known: int | None) -> list[int]:
    """Our daemon's processes that its pid file does not name (a lost or stale pid file)."""
    return [proc.pid for proc in psutil.process_iter()
            if proc.pid != known and _is_ours(proc, daemon, marker)]


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _pick_ports(root: Path) -> tuple[int, int]:
    """Slurm's defaults when free; else a pair derived from the state dir, so two instances
    created while neither runs still get different ports."""
    if all(_port_free(p) for p in DEFAULT_PORTS):
        return DEFAULT_PORTS
    base = 20000 + (zlib.crc32(str(root).encode()) % 4000) * 2
    for offset in range(0, 4000, 2):
        ctld = 20000 + (base - 20000 + offset) % 8000
        if _port_free(ctld) and _port_free(ctld + 1):
            return ctld, ctld + 1
    raise LocalSlurmError("no two free TCP ports between 20000 and 28000 for slurmctld/slurmd")
