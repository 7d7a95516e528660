"""The spec's settings for the cloud backends, and the providers they give the pipeline.

``PipelineSpec`` holds ``parallelcluster:`` or ``batch:`` (models below). Loading the spec
already validates the referenced config file offline (ParallelCluster's schema and
clusterflow's checks, or the Batch model), so a bad file is refused with the spec, before any
resource exists. The account look-ups (subnets, key pair, AZ offerings) run when the backend
is opened, still before anything is created.

The pipeline's ``mpi_run`` opens the backend around the job::

    with parallelcluster_backend(spec.parallelcluster, aws, progress=logger.info) as provider:
        command = provider.launcher().command(spec.ranks, argv)
        job = provider.submit(command, ranks=..., job_name=..., workdir=run_dir, env=...)
        ... poll provider.status(job) as for any provider ...

(``batch_backend(spec.batch, aws, ...)`` the same way.)

For ParallelCluster, leaving the block applies ``teardown`` (the cluster is deleted after
the run unless told otherwise, even when the run failed); for Batch, ``teardown: after_run``
removes the environment (its default ``never`` keeps it: it costs nothing while no job runs,
since the compute environment scales to 0 vCPUs).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from infra.aws.clients import AwsTarget
from infra.backends.shell_safety import PLAIN_PATH, NoControlChars
from infra.clusters.config_issues import ConfigInvalid
from infra.clusters.parallelcluster import TeardownPolicy

Progress = Callable[[str], None]
CLUSTER_NAME = r"^[a-zA-Z][a-zA-Z0-9-]{0,59}$"  # ParallelCluster's rule for cluster names


def _quiet(_: str) -> None:
    pass


class _Strict(NoControlChars):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _refuse(e: ConfigInvalid) -> ValueError:
    return ValueError(f"{e.source}: " + "; ".join(str(i) for i in e.issues))


class ParallelClusterSettings(_Strict):
    config: Path = Field(description="ParallelCluster 3 config (cluster_configs/*.yaml)")
    cluster_name: str = Field(pattern=CLUSTER_NAME)
    teardown: TeardownPolicy = "after_run"
    queue: str | None = Field(None, description="Slurm queue (partition); default: the first")
    remote_root: str = Field("/fsx/clusterflow", pattern=PLAIN_PATH,
                             description="run directories on the cluster's shared storage "
                             "(an absolute path of letters, digits and . _ + @ - /)")
    run_as: str | None = Field("ec2-user", description="the cluster's user that submits jobs")
    python: str = Field("python3", description="the cluster's interpreter for the kernel")
    create_timeout_minutes: int = Field(60, ge=5, le=240)
    max_interruptions: int = Field(3, ge=0, le=100, description="on a SPOT queue: requeues "
                                   "after a reclaim before the job fails instead of resuming")

    @property
    def spot(self) -> bool:
        """Whether the queue jobs go to is a Spot one (``CapacityType: SPOT``): its jobs are
        then submitted with ``--requeue`` and resume after a reclaim."""
        from infra.clusters.config_issues import load_yaml_mapping

        queues = load_yaml_mapping(self.config)["Scheduling"]["SlurmQueues"]
        queue = next((q for q in queues if q["Name"] == self.queue), queues[0])
        return str(queue.get("CapacityType", "ONDEMAND")).upper() == "SPOT"

    @model_validator(mode="after")
    def _config_is_valid(self) -> ParallelClusterSettings:
        from infra.clusters.parallelcluster_validate import load_cluster_config

        try:
            cluster = load_cluster_config(self.config)
        except ConfigInvalid as e:
            raise _refuse(e) from None
        queues = [q["Name"] for q in cluster.raw["Scheduling"]["SlurmQueues"]]
        if self.queue is not None and self.queue not in queues:
            raise ValueError(f"queue '{self.queue}' is not in {self.config} (queues: "
                             f"{', '.join(queues)})")
        return self


class BatchSettings(_Strict):
    config: Path = Field(description="clusterflow Batch config (cluster_configs/batch/*.yaml)")
    teardown: Literal["never", "after_run"] = "never"

    @model_validator(mode="after")
    def _config_is_valid(self) -> BatchSettings:
        from infra.clusters.batch_config import load_batch_config

        try:
            load_batch_config(self.config)
        except ConfigInvalid as e:
            raise _refuse(e) from None
        return self


@contextlib.contextmanager
def parallelcluster_backend(settings: ParallelClusterSettings, aws: AwsTarget, *,
                            progress: Progress = _quiet, api: Any = None) -> Iterator[Any]:
    """A ``ParallelClusterProvider`` on a cluster that exists for the block (created if
    needed, torn down per ``settings.teardown`` when the block ends)."""
    from infra.backends.providers.parallelcluster import ParallelClusterProvider
    from infra.clusters.parallelcluster import ParallelCluster, cluster_session
    from infra.clusters.parallelcluster_validate import config_region, load_cluster_config

    region = config_region(load_cluster_config(settings.config).raw, aws.region)
    target = dataclasses.replace(aws, region=region)
    config = load_cluster_config(settings.config, aws=target)  # account look-ups, first
    for warning in config.warnings:  # what ParallelCluster would only warn about: said, not fatal
        progress(f"{settings.config}: {warning}")
    queue = settings.queue or config.raw["Scheduling"]["SlurmQueues"][0]["Name"]
    kwargs: dict[str, Any] = {"api": api} if api is not None else {}
    cluster = ParallelCluster(settings.cluster_name, target, **kwargs)
    with cluster_session(cluster, config, settings.teardown, progress=progress,
                         remote_root=settings.remote_root,
                         timeout_s=settings.create_timeout_minutes * 60) as session:
        yield ParallelClusterProvider(session.shell(), remote_root=settings.remote_root,
                                      partition=queue, run_as=settings.run_as,
                                      python=settings.python, requeue=settings.spot,
                                      max_interruptions=settings.max_interruptions)


@contextlib.contextmanager
def batch_backend(settings: BatchSettings, aws: AwsTarget, *,
                  progress: Progress = _quiet) -> Iterator[Any]:
    """A ``BatchProvider`` on a provisioned MNP environment (removed afterwards with
    ``teardown: after_run``)."""
    from infra.backends.providers.batch import BatchProvider
    from infra.clusters.batch.provision import delete_environment
    from infra.clusters.batch_config import load_batch_config

    config = load_batch_config(settings.config)
    target = dataclasses.replace(aws, region=config.region)
    provider = BatchProvider(target, config, source=str(settings.config), progress=progress)
    provider.environment()  # refused here (ConfigInvalid) if the account lacks anything
    try:
        yield provider
    finally:
        if settings.teardown == "after_run":
            delete_environment(target, config, progress=progress)
