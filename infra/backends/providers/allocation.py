"""Ranks as job steps (``srun``) inside the Slurm allocation this process already runs in.

A flow run that the ``clusterflow-slurm`` work pool submitted *is* a Slurm job: its batch
script runs the Prefect engine with ``SLURM_JOB_ID`` set and the tasks the pool's template
asked for. Submitting its MPI steps as new ``sbatch`` jobs would queue them behind the very
allocation that holds their CPUs, and a bare ``mpiexec`` would run them outside Slurm's view
(no accounting, no ``scancel``). So inside an allocation the ``local`` and ``slurm`` backends
start each job as a job step of it: ``srun --mpi=pmix -n N`` from this process, which Slurm
places on the allocation's tasks, accounts as ``<jobid>.<step>``, and kills with the job
(``scancel`` of the flow run reaches every rank). Steps wait for free tasks within the
allocation, so a sweep wider than the allocation runs a few points at a time.

The step itself is a local process group (as the local provider runs ``mpiexec``): its
status is srun's exit status, and cancel signals srun, which ends the step's ranks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from infra.backends.launchers import MpiexecLauncher, SrunLauncher
from infra.backends.providers.local import LocalProvider


def current_allocation(env: Mapping[str, str] | None = None) -> str | None:
    """The id of the Slurm job this process runs inside (an sbatch script, salloc), or None."""
    job = (os.environ if env is None else env).get("SLURM_JOB_ID", "").strip()
    return job or None


class AllocationProvider(LocalProvider):
    """Jobs as ``srun`` steps of the allocation ``allocation`` (a Slurm job id).

    ``launcher="mpiexec"`` (an explicit choice in the spec) starts Open MPI's mpiexec instead,
    which also takes its slots from the allocation (``SLURM_*``). ``overcommit`` lets a step
    have more ranks than the allocation has CPUs (srun ``--overcommit``, mpiexec
    ``--oversubscribe``), as the local backend always allowed.
    """

    label = "slurm-step"

    def __init__(self, allocation: str, *, launcher: str = "srun",
                 overcommit: bool = False) -> None:
        super().__init__()
        if launcher not in ("srun", "mpiexec"):
            raise ValueError(f"launcher must be srun or mpiexec, got {launcher!r}")
        self.allocation, self.launcher_name, self.overcommit = allocation, launcher, overcommit

    def launcher(self) -> SrunLauncher | MpiexecLauncher:
        if self.launcher_name == "mpiexec":
            return MpiexecLauncher(oversubscribe=self.overcommit)
        return SrunLauncher(extra_args=("--overcommit",) if self.overcommit else ())
