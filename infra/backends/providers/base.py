"""The provider contract, after Parsl's ``ExecutionProvider``: submit, status, cancel.

A provider says where resources come from; a launcher (``infra.backends.launchers``) says how ranks
start inside them. Keeping the two apart is what lets one pipeline run unchanged on a laptop
(mpiexec), a Slurm allocation (srun/mpiexec) or a cloud cluster.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ArrayItem:
    """One element of a sweep's job array (Slurm, ParallelCluster): its index, command line,
    working dir and environment."""

    index: int
    command: list[str]
    workdir: Path
    env: dict[str, str]


class Launcher(Protocol):
    def command(self, ranks: int, argv: list[str]) -> list[str]: ...


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    exit_code: int | None = None
    message: str = ""


@dataclass(frozen=True)
class JobHandle:
    job_id: str
    stdout: Path
    stderr: Path


class ExecutionProvider(ABC):
    """Runs one command line somewhere and reports on it; nothing more."""

    label: str

    @abstractmethod
    def launcher(self) -> Launcher:
        """How ranks start inside what this provider allocates (mpiexec, srun, ...)."""

    @abstractmethod
    def submit(self, command: list[str], *, ranks: int, job_name: str, workdir: Path,
               env: dict[str, str] | None = None) -> JobHandle:
        """Start ``command`` (already wrapped by the launcher) with ``ranks`` slots; return at
        once. stdout/stderr go to the handle's paths."""

    @abstractmethod
    def status(self, job: JobHandle) -> JobStatus: ...

    @abstractmethod
    def cancel(self, job: JobHandle) -> None: ...

    def pause(self, job: JobHandle, seconds: float) -> None:
        """Wait up to ``seconds`` between two status polls. A provider that can hear the job
        end (a local process) returns as soon as it does; a scheduler is asked again later."""
        time.sleep(seconds)
