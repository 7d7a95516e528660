"""The AWS Batch provider: one multi-node parallel (MNP) job per submission.

``launcher()`` wraps the kernel in ``infra/clusters/batch_mnp_entry.py`` as the image runs it;
the main node builds the hostfile and runs ``mpirun`` over all nodes. ``submit`` sizes the job
(``ceil(ranks / ranks_per_node)`` nodes, at least 2, at most ``max_nodes``) and sends it with
``nodeOverrides``; ``status`` maps Batch's states and, on failure, carries every reason Batch
gives (``statusReason``, the container's ``reason`` and exit code, per attempt); ``cancel``
terminates the job whatever its state. The main node's CloudWatch log stream is mirrored into
the handle's stdout file.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from infra.aws.clients import AwsTarget
from infra.backends.providers.base import ExecutionProvider, JobHandle, JobStatus
from infra.backends.providers.remote import append, mirror_paths, remote_argv
from infra.backends.providers.spot import Interruptions, batch_interruptions
from infra.clusters.batch import bodies, jobs, provision
from infra.clusters.batch.common import BatchEnvironment, Progress, _quiet
from infra.clusters.batch_config import BatchMnpConfig


@dataclass(frozen=True)
class BatchMnpLauncher:
    config: BatchMnpConfig

    def command(self, ranks: int, argv: list[str]) -> list[str]:
        c = self.config.container
        return [*c.entry, "--ranks", str(ranks), "--slots", str(self.config.slots_per_node),
                "--mpirun", shlex.join(c.mpirun), *(f"--mpirun-arg={a}" for a in c.mpirun_args),
                "--", *remote_argv(argv, c.python)]


@dataclass
class _Watch:
    log_stream: str | None = None
    next_token: str | None = None


@dataclass
class BatchProvider(ExecutionProvider):
    aws: AwsTarget
    config: BatchMnpConfig
    source: str = "<config>"
    progress: Progress = _quiet
    label: str = "batch"
    _env: BatchEnvironment | None = field(default=None, init=False)
    _watch: dict[str, _Watch] = field(default_factory=dict, init=False)
    _last: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)

    def environment(self) -> BatchEnvironment:
        """Provision (idempotently) on first use; invalid configs are refused before any call
        creates anything."""
        if self._env is None:
            self._env = provision.ensure_environment(self.aws, self.config, progress=self.progress,
                                                 source=self.source)
        return self._env

    def launcher(self) -> BatchMnpLauncher:
        return BatchMnpLauncher(self.config)

    def submit(self, command: list[str], *, ranks: int, job_name: str, workdir: Path,
               env: dict[str, str] | None = None) -> JobHandle:
        bodies.nodes_for(self.config, ranks)  # refuse an impossible size before provisioning
        environment = self.environment()
        out, err = mirror_paths(workdir, job_name)
        job_id = jobs.submit(self.aws, environment, name=f"{job_name}-{workdir.name}",
                              main_command=command, ranks=ranks, environment=env)
        self._watch[job_id] = _Watch()
        self.progress(f"submitted AWS Batch job {job_id} "
                      f"({bodies.nodes_for(self.config, ranks)} nodes, {ranks} ranks)")
        return JobHandle(job_id=job_id, stdout=out, stderr=err)

    def status(self, job: JobHandle) -> JobStatus:
        desc = jobs.describe_job(self.aws, job.job_id)
        self._last[job.job_id] = desc
        self._mirror_logs(job, desc)
        state, code, message = jobs.job_state(desc)
        return JobStatus(state, code, message)

    def interruptions(self, job: JobHandle) -> Interruptions:
        """Attempts that ended because their instance went away (and were retried, up to
        the config's max_interruptions), from the job's last description."""
        desc = self._last.get(job.job_id) or jobs.describe_job(self.aws, job.job_id)
        return batch_interruptions(desc)

    def cancel(self, job: JobHandle) -> None:
        jobs.terminate(self.aws, job.job_id)

    def _mirror_logs(self, job: JobHandle, desc: dict[str, Any]) -> None:
        watch = self._watch.setdefault(job.job_id, _Watch())
        if watch.log_stream is None:
            watch.log_stream = _log_stream(desc) or _log_stream(self._main_node(job.job_id))
        if watch.log_stream is None:
            return
        logs = self.aws.client("logs")
        kwargs: dict[str, Any] = {"logGroupName": self.config.log_group,
                                  "logStreamName": watch.log_stream, "startFromHead": True}
        while True:
            if watch.next_token:
                kwargs["nextToken"] = watch.next_token
            try:
                page = logs.get_log_events(**kwargs)
            except ClientError as e:
                if e.response["Error"]["Code"] == "ResourceNotFoundException":
                    return  # the stream appears once the container has written something
                raise
            append(job.stdout, b"".join(f"{ev['message']}\n".encode() for ev in page["events"]))
            if page.get("nextForwardToken") in (None, watch.next_token):
                return
            watch.next_token = page["nextForwardToken"]

    def _main_node(self, job_id: str) -> dict[str, Any]:
        """The main node's own job (``<id>#0``), where Batch puts the MNP log stream."""
        found = self.aws.client("batch").describe_jobs(jobs=[f"{job_id}#0"])["jobs"]
        return dict(found[0]) if found else {}


def _log_stream(desc: dict[str, Any]) -> str | None:
    stream = desc.get("container", {}).get("logStreamName")
    if stream:
        return str(stream)
    for attempt in reversed(desc.get("attempts", [])):
        stream = attempt.get("container", {}).get("logStreamName")
        if stream:
            return str(stream)
    return None
