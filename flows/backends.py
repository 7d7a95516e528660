"""Backends as the pipeline opens them: each one once per run, closed when the run ends.

A cloud backend (a ParallelCluster cluster, a Batch environment) is expensive to open; a
multi-step run shares one of each among all its steps and applies ``teardown`` only when the
whole pipeline ends, failed or not.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from infra.aws.clients import AwsTarget
from infra.backends.providers.allocation import AllocationProvider, current_allocation
from infra.backends.providers.base import ExecutionProvider
from infra.backends.providers.local import LocalProvider

if TYPE_CHECKING:
    from flows.spec import PipelineSpec


def slurm_provider(spec: PipelineSpec) -> ExecutionProvider:
    from infra.backends.providers.slurm import SlurmProvider

    o = spec.slurm
    return SlurmProvider(partition=o.partition, time_limit=o.time_limit, launcher=o.launcher,
                         slurm_conf=o.conf, overcommit=o.overcommit, sbatch_args=o.sbatch_args,
                         requeue=o.requeue, max_interruptions=o.max_interruptions)


def requeues(spec: PipelineSpec, backend: str) -> bool:
    """Whether a job on ``backend`` runs its script again after a Spot reclaim (slurm with
    ``requeue``, a ParallelCluster SPOT queue), so its kernel must always start with
    ``--restart`` and resume from its newest checkpoint."""
    if backend == "slurm":
        return spec.slurm.requeue
    if backend == "parallelcluster" and spec.parallelcluster is not None:
        return spec.parallelcluster.spot
    return False


@contextlib.contextmanager
def open_backend(spec: PipelineSpec, aws: AwsTarget, logger: Any) -> Iterator[ExecutionProvider]:
    """The spec's provider; cloud backends create what they need on entry (a cluster, a Batch
    environment) and apply the spec's ``teardown`` on exit, whether the jobs succeeded or not.
    Its jobs are known to the run's budget watchdog, which cancels them past the budget.
    """
    from flows.watchdog import guard

    with _open_backend(spec, aws, logger) as provider:
        yield guard(provider)


@contextlib.contextmanager
def _open_backend(spec: PipelineSpec, aws: AwsTarget,
                  logger: Any) -> Iterator[ExecutionProvider]:
    allocation = current_allocation() if spec.backend in ("local", "slurm") else None
    if allocation is not None:
        # A flow run that is itself a Slurm job (the clusterflow-slurm pool): its jobs are
        # srun steps of that allocation, not new sbatch jobs or processes outside Slurm.
        logger.info("inside Slurm job %s: %s jobs run as srun steps of it", allocation,
                    spec.backend)
        slurm = spec.backend == "slurm"
        yield AllocationProvider(allocation,
                                 launcher=spec.slurm.launcher if slurm else "srun",
                                 overcommit=spec.slurm.overcommit if slurm else True)
    elif spec.backend == "local":
        yield LocalProvider()
    elif spec.backend == "slurm":
        yield slurm_provider(spec)
    elif spec.backend == "parallelcluster":
        from infra.backends.settings import parallelcluster_backend

        with parallelcluster_backend(spec.parallelcluster, aws, progress=logger.info) as p:
            yield p
    else:
        from infra.backends.settings import batch_backend

        with batch_backend(spec.batch, aws, progress=logger.info) as p:
            yield p


class BackendSession:
    """Opens each backend a run uses on first use, once, and closes them all at the end."""

    def __init__(self, spec: PipelineSpec, aws: AwsTarget, logger: Any) -> None:
        self.spec, self.aws, self.logger = spec, aws, logger
        self._stack = contextlib.ExitStack()
        self._open: dict[str, ExecutionProvider] = {}
        self._lock = threading.Lock()

    def get(self, backend: str) -> ExecutionProvider:
        with self._lock:
            if backend not in self._open:
                spec = self.spec.model_copy(update={"backend": backend})
                self._open[backend] = self._stack.enter_context(
                    open_backend(spec, self.aws, self.logger))
            return self._open[backend]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> BackendSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
