"""A step's command line: placeholders filled, the executable found, the launcher wrapped.

Launchers: ``mpiexec`` (the venv's Open MPI, whose mpi4py the bundled kernels use), ``srun``
(inside a Slurm allocation), ``none`` (one plain process) or ``{mpiexec: PATH, args: [...]}``
for an application built against another MPI (Debian's ``/usr/bin/mpirun``, a module's):
an application must be started by the launcher of the MPI it was linked with, or every rank
comes up as its own size-1 job.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flows.steps.model import StepSpec, SystemMpiexec
from flows.steps.placeholders import fill
from infra.backends.launchers import MpiexecLauncher, SrunLauncher
from infra.backends.providers.base import ExecutionProvider

REPO = Path(__file__).resolve().parents[2]


def job_env(step: StepSpec, values: dict[str, str]) -> dict[str, str]:
    """What every step's processes get on top of the caller's environment.

    The venv's ``bin`` leads PATH, so ``python`` and ``mpiexec`` in a command mean the ones
    clusterflow runs with (mpi4py and its Open MPI), as they would in an activated venv.
    """
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                      if p),
        "CLUSTERFLOW_RUN_ID": values["run_id"],
        "CLUSTERFLOW_STEP": step.name,
        "CLUSTERFLOW_POINT": values["point"],
        "CLUSTERFLOW_OUT": values["out"],
    }
    if isinstance(step.launcher, SystemMpiexec) and os.geteuid() == 0:
        # Open MPI refuses root unless told twice; harmless for other MPIs.
        env |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    env |= {k: fill(v, values) for k, v in step.env.items()}
    return env


def command_argv(step: StepSpec, values: dict[str, str], spec_dir: Path) -> list[str]:
    """The step's own argv with placeholders filled; a relative executable path is taken
    relative to the spec's folder (the step itself runs in its own work directory)."""
    assert step.command is not None
    argv = [fill(a, values) for a in step.command]
    if "/" in argv[0] and not argv[0].startswith("/"):
        argv[0] = str((spec_dir / argv[0]).resolve())
    return argv


def in_dir(directory: Path, argv: list[str]) -> list[str]:
    """``argv`` run from ``directory`` (coreutils ``env -C``): every rank chdirs itself, so
    the working directory does not depend on the launcher or scheduler."""
    return ["env", "-C", str(directory), *argv]


def wrap(step: StepSpec, provider: ExecutionProvider, backend: str, ranks: int,
         argv: list[str]) -> list[str]:
    """``argv`` started on ``ranks`` ranks the way the step asks."""
    launcher = step.launcher
    if launcher == "none":
        return argv
    if isinstance(launcher, SystemMpiexec):
        extra = ["--oversubscribe"] if backend == "local" and _is_open_mpi(launcher) else []
        return [launcher.mpiexec, "-n", str(ranks), *extra, *launcher.args, *argv]
    if launcher == "srun":
        # On ParallelCluster the batch script's exit trap does the guard's work
        # (infra.backends.providers.parallelcluster): this machine's guard file is not there.
        return SrunLauncher(guard=backend != "parallelcluster").command(ranks, argv)
    if launcher == "mpiexec" and (backend != "local" or getattr(provider, "allocation", None)):
        # Also inside a Slurm allocation (a flow run of the Slurm pool), where the default is
        # srun: the spec's explicit choice wins.
        return MpiexecLauncher(oversubscribe=getattr(provider, "overcommit", False)).command(
            ranks, argv)
    return provider.launcher().command(ranks, argv)


def _is_open_mpi(launcher: SystemMpiexec) -> bool:
    """Whether a system launcher is Open MPI's (which needs --oversubscribe for N > cores)."""
    if "--oversubscribe" in launcher.args:
        return False
    real = Path(launcher.mpiexec).resolve().name
    return real.startswith(("orterun", "prterun", "mpirun.openmpi", "mpiexec.openmpi"))
