"""Will this job fit where it is sent? Checked before any bucket, queue or process exists.

A spec can be valid field by field and still be unable to run: 64 ranks on a 2-core laptop
(the machine thrashes for hours), or a grid whose arrays need more memory than the machine has
(a ``MemoryError`` minutes later, after AWS resources were created). The numbers are known up
front: the kernel's parameters give its memory (``mpi_jobs.catalog``'s estimates), the machine
gives its cores and available memory. ``check_resources`` compares them and refuses with both
numbers, for one kernel run (the pipeline calls it per spec; a multi-step spec per step).

Only the ``local`` backend runs ranks on this machine, so only it is checked against this
machine; Slurm, ParallelCluster and Batch size their own allocations (and refuse what does not
fit there).

Oversubscription (more ranks than cores) is fine for correctness runs and is how the test
suite runs 2-4 ranks on 2 cores, so the default allows up to 2 ranks per core; more must be
asked for (``local: {oversubscribe: 8}`` or ``true`` for no limit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.errors import SpecError
from mpi_jobs.catalog import KERNELS

DEFAULT_OVERSUBSCRIBE = 2.0


class LocalOptions(BaseModel):
    """How the ``local`` backend may use this machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    oversubscribe: bool | float = Field(
        DEFAULT_OVERSUBSCRIBE,
        description="ranks allowed per core: a number >= 1 (default 2), false for at most one "
        "rank per core, true for any number of ranks")

    @field_validator("oversubscribe", mode="before")
    @classmethod
    def _factor(cls, v: Any) -> bool | float:
        # Checked by hand: a bool is also an int, and a union's errors would name its branches.
        if isinstance(v, bool):
            return v
        if isinstance(v, int | float) and 1 <= v < float("inf"):
            return float(v)
        raise ValueError(f"must be a number of ranks per core >= 1, false (one rank per core) "
                         f"or true (no limit), got {v!r}")

    def max_ranks(self, cores: int) -> int | None:
        """The most ranks allowed on ``cores`` cores; None for no limit."""
        if self.oversubscribe is True:
            return None
        factor = 1.0 if self.oversubscribe is False else float(self.oversubscribe)
        return max(1, int(factor * cores))


@dataclass(frozen=True)
class Machine:
    """What this machine offers a local run."""

    cores: int
    available_bytes: int

    @classmethod
    def current(cls) -> Machine:
        return cls(cores=usable_cores(), available_bytes=available_memory())


def usable_cores() -> int:
    """CPUs this process may run on (affinity, so a taskset or cgroup cpuset counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return psutil.cpu_count() or 1


def available_memory() -> int:
    """Memory a new job can take: the kernel's 'available' figure, capped by a cgroup v2 limit
    (a container's memory.max is what the OOM killer enforces, not the host's RAM)."""
    available = psutil.virtual_memory().available
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_resources(kernel_name: str | None, parameters: BaseModel | dict[str, Any], ranks: int,
                    backend: str, *, local: LocalOptions | None = None,
                    machine: Machine | None = None, where: str = "") -> None:
    """Raise SpecError (one line, with the numbers) if the job cannot run where it is sent.

    ``where`` prefixes the message (e.g. ``pipeline spec run.yaml`` or ``steps[1]``).
    ``machine`` defaults to this one; tests pass their own. ``kernel_name`` None (a step's
    own command) checks the ranks only: clusterflow cannot know what a program allocates.
    """
    if backend != "local":
        return
    local = local or LocalOptions()
    machine = machine or Machine.current()
    prefix = f"{where}: " if where else ""
    limit = local.max_ranks(machine.cores)
    if limit is not None and ranks > limit:
        per_core = "1 rank" if local.oversubscribe is False else f"{local.oversubscribe:g} ranks"
        raise SpecError(
            f"{prefix}ranks: {ranks} ranks on the local backend would oversubscribe this "
            f"machine's {machine.cores} cores {ranks / machine.cores:.1f}x (allowed: "
            f"{per_core} per core, {limit} ranks); use at most {limit} ranks, another "
            f"backend, or allow it with local: {{oversubscribe: {-(-ranks // machine.cores)}}}"
            f" (or true)")
    if kernel_name is None:
        return
    needed = KERNELS[kernel_name].memory_estimate(parameters, ranks)
    if needed > machine.available_bytes:
        raise SpecError(
            f"{prefix}kernel.parameters: {kernel_name} on {ranks} ranks needs about "
            f"{format_bytes(needed)} of memory ({_shape(kernel_name, parameters)}), but this "
            f"machine has {format_bytes(machine.available_bytes)} available; make the problem "
            f"smaller or run it on a cluster backend (slurm, parallelcluster, batch)")


def _shape(kernel_name: str, parameters: BaseModel | dict[str, Any]) -> str:
    """The parameters that drive a kernel's memory, for the refusal message."""
    p = parameters if isinstance(parameters, dict) else parameters.model_dump()
    keys = {"heat": ("nx", "ny", "nz"), "var": ("paths", "block_paths", "confidence"),
            "kmer": ("k", "reads", "read_length", "genome_length", "chunk_bytes", "top")}
    return ", ".join(f"{k}={p[k]}" for k in keys[kernel_name] if p.get(k) is not None)


# Directories that are a system's own: a run directory must never be made in them (or be
# them). Their subdirectories are fine only where users keep data (/tmp/x, /mnt/x, /home/u/x).
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                "/proc", "/sbin", "/sys", "/usr")
SYSTEM_ROOTS = ("/", "/home", "/media", "/mnt", "/opt", "/root", "/run", "/srv", "/tmp",
                "/var", "/var/lib", "/var/log", "/var/tmp", "/var/cache")


def scratch_dir_problem(path: Path) -> str | None:
    """Why ``path`` must not hold run directories, or None.

    Every run creates its own directory (inputs, outputs, checkpoints, rank logs) under the
    scratch dir, so it must not be a filesystem root, a system directory or a home directory
    itself, where runs would litter (or, in /proc or /sys, fail oddly).
    """
    resolved = Path(os.path.expanduser(path)).resolve()
    home = Path.home().resolve()
    if str(resolved) in SYSTEM_ROOTS:
        return f"{path} is the system directory {resolved}"
    for tree in SYSTEM_TREES:
        if resolved == Path(tree) or Path(tree) in resolved.parents:
            return f"{path} is inside the system directory {tree}"
    if resolved == home:
        return f"{path} is the home directory {home} itself"
    return None


def check_scratch_dir(path: Path) -> Path:
    """``path`` if run directories may go there, else ValueError (for pydantic validators)."""
    problem = scratch_dir_problem(path)
    if problem is not None:
        raise ValueError(f"{problem}: use a directory of its own, e.g. "
                         f"{Path.home() / 'clusterflow-scratch'} or .clusterflow/scratch")
    return path
