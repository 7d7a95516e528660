"""One MNP job: submitted with ``nodeOverrides`` (node count, the main node's command), watched
through ``describe_jobs`` (with every reason Batch gives on failure), stopped with
``terminate_job``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from infra.aws.clients import AwsTarget
from infra.backends.providers.base import JobState
from infra.clusters.batch.bodies import check_node_properties, node_properties, nodes_for
from infra.clusters.batch.common import CANCEL_REASON, BatchEnvironment, BatchError, _tags

JOB_NAME_RE = re.compile(r"[^A-Za-z0-9_-]")
PENDING_STATES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING")



def job_name(name: str) -> str:
    return JOB_NAME_RE.sub("-", name)[:128] or "clusterflow"


def submit(aws: AwsTarget, env: BatchEnvironment, *, name: str, main_command: list[str],
           ranks: int, environment: Mapping[str, str] | None = None) -> str:
    """Submit one MNP job sized for ``ranks``; returns the job id."""
    cfg = env.config
    nodes = nodes_for(cfg, ranks)
    env_list = [{"name": k, "value": v} for k, v in sorted((environment or {}).items())]
    overrides = [
        {"targetNodes": "0:0", "containerOverrides": {"command": main_command,
                                                      "environment": env_list}},
        {"targetNodes": "1:", "containerOverrides": {"environment": env_list}},
    ]
    props = node_properties(cfg, nodes)
    check_node_properties(props, overrides)
    resp = aws.client("batch").submit_job(
        jobName=job_name(name), jobQueue=env.job_queue_arn, jobDefinition=env.job_definition_arn,
        nodeOverrides={"numNodes": nodes, "nodePropertyOverrides": overrides},
        tags=_tags(cfg), propagateTags=True,
    )
    return str(resp["jobId"])


def describe_job(aws: AwsTarget, job_id: str) -> dict[str, Any]:
    jobs = aws.client("batch").describe_jobs(jobs=[job_id])["jobs"]
    if not jobs:
        raise BatchError(f"AWS Batch does not know job {job_id} (jobs are kept ~7 days after "
                         "they end)")
    return dict(jobs[0])


def failure_reason(job: Mapping[str, Any]) -> str:
    """Every reason Batch gives, most specific first: the job, its container, its attempts."""
    parts: list[str] = []

    def add(label: str, value: Any) -> None:
        if value not in (None, "") and f"{label}{value}" not in parts:
            parts.append(f"{label}{value}")

    add("", job.get("statusReason"))
    container = job.get("container", {})
    add("container: ", container.get("reason"))
    add("exit code ", container.get("exitCode"))
    for k, attempt in enumerate(job.get("attempts", []), 1):
        add(f"attempt {k}: ", attempt.get("statusReason"))
        add(f"attempt {k} container: ", attempt.get("container", {}).get("reason"))
        add(f"attempt {k} exit code ", attempt.get("container", {}).get("exitCode"))
    return "; ".join(parts) or "AWS Batch gave no reason; see the main node's log stream"


def job_state(job: Mapping[str, Any]) -> tuple[JobState, int | None, str]:
    status = job.get("status", "")
    code = job.get("container", {}).get("exitCode")
    if status in PENDING_STATES:
        return JobState.PENDING, None, status
    if status == "RUNNING":
        return JobState.RUNNING, None, status
    if status == "SUCCEEDED":
        return JobState.COMPLETED, code if code is not None else 0, status
    if status == "FAILED":
        reason = failure_reason(job)
        if CANCEL_REASON in str(job.get("statusReason", "")):
            return JobState.CANCELLED, code, reason
        return JobState.FAILED, code, reason
    raise BatchError(f"unexpected AWS Batch job status {status!r}")


def terminate(aws: AwsTarget, job_id: str, reason: str = CANCEL_REASON) -> None:
    """Stop the job in any state (terminate_job also cancels jobs that have not started)."""
    aws.client("batch").terminate_job(jobId=job_id, reason=reason)
