"""AWS Batch multi-node parallel (MNP) with EFA: provisioning the control plane, idempotently.

What ``ensure_environment`` converges on, in order (each step describes before it creates):

1. a *cluster* placement group (``ec2.create_placement_group``, one AZ, instances close);
2. a launch template whose network interfaces are EFA (``InterfaceType: efa``, one per network
   card the instance type has), plus user data that mounts FSx for Lustre when configured;
3. a MANAGED, ON_DEMAND compute environment using both (``minvCpus`` 0: nothing runs idle);
4. a job queue on it;
5. a ``type=multinode`` job definition with two node groups, ``0:0`` (the main node) and ``1:``
   (the workers), EFA devices ``/dev/infiniband/uverbs{i}`` in ``linuxParameters.devices`` and
   an unlimited ``memlock`` ulimit. Every node runs ``infra/clusters/batch_mnp_entry.py``: the
   main node builds the hostfile from the workers' registrations and runs ``mpirun``.

A resource that exists with other settings is reported (``BatchDriftError``) instead of being
silently reused or replaced. Jobs are submitted with ``nodeOverrides`` (node count and the
main node's command), watched through ``describe_jobs``, and stopped with ``terminate_job``.

Batch's documented MNP limits are enforced with clear errors before any call: at most 1,000
nodes and five node groups per job, one instance type for all node groups, no Spot. Retries
(``attempts``) are Batch's: only a failure of the main node starts another attempt; a child
node failing does not.

On the embedded endpoint (moto with ``{"batch": {"use_docker": false}}``) the whole control
plane runs, with two differences from AWS: jobs are SUCCEEDED (or FAILED, with
``MOTO_SIMPLE_BATCH_FAIL_AFTER``) before ``submit_job`` returns, and ``describe_job_definitions``
omits ``nodeProperties``. Reuse of a job definition is therefore decided by a content hash kept
in its tags, never by comparing the described body.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError

from infra.aws.clients import AwsTarget
from infra.aws.preflight import Preflight
from infra.clusters.batch.bodies import (
    compute_resources,
    job_definition_request,
    launch_template_data,
)
from infra.clusters.batch.common import (
    HASH_TAG,
    BatchDriftError,
    BatchEnvironment,
    BatchError,
    Progress,
    _code,
    _quiet,
    _sha256,
    _tags,
)
from infra.clusters.batch_config import BatchMnpConfig, aws_issues, instance_issues, subnet_issues
from infra.clusters.config_issues import ConfigInvalid


def preflight(aws: AwsTarget, cfg: BatchMnpConfig, source: str = "<config>") -> None:
    """Everything that can be refused before a resource exists: the config itself, then the
    account (subnets, one AZ, security groups, key pair, instance offering)."""
    issues = instance_issues(cfg)
    if not issues:
        online, azs = aws_issues(cfg, Preflight(aws))
        issues = subnet_issues(cfg, {**cfg.subnet_azs, **azs}) + online
    if issues:
        raise ConfigInvalid(source, issues)


def _wait(describe: Callable[[], dict[str, Any] | None], what: str, *, timeout: float,
          ready: Callable[[dict[str, Any]], bool], progress: Progress,
          interval: float = 2.0, invalid_ok: bool = False) -> dict[str, Any] | None:
    """Poll until ``ready`` (or gone); INVALID is an error unless tearing down."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    last = None
    while True:
        item = describe()
        if item is not None and item.get("status") == "INVALID" and not invalid_ok:
            raise BatchError(f"{what} is INVALID: {item.get('statusReason', 'no reason given')}")
        if item is None or ready(item):
            return item
        state = (item.get("status"), item.get("state"))
        if state != last:
            progress(f"{what}: {item.get('status')} ({item.get('state')})")
            last = state
        if time.monotonic() > deadline:
            raise BatchError(f"{what} still {item.get('status')} after {timeout:.0f} s; "
                             "check it in the AWS Batch console")
        time.sleep(delay)
        delay = min(delay * 2, interval)


def _describe_ce(batch: Any, name: str) -> dict[str, Any] | None:
    found = batch.describe_compute_environments(computeEnvironments=[name])
    envs = [e for e in found["computeEnvironments"] if e.get("status") != "DELETED"]
    return envs[0] if envs else None


def _describe_queue(batch: Any, name: str) -> dict[str, Any] | None:
    found = batch.describe_job_queues(jobQueues=[name])
    queues = [q for q in found["jobQueues"] if q.get("status") != "DELETED"]
    return queues[0] if queues else None


def _ensure_placement_group(ec2: Any, cfg: BatchMnpConfig, progress: Progress) -> str:
    name = cfg.resource_names()["placement_group"]
    try:
        group = ec2.describe_placement_groups(GroupNames=[name])["PlacementGroups"][0]
    except ClientError as e:
        if _code(e) != "InvalidPlacementGroup.Unknown":
            raise
        ec2.create_placement_group(
            GroupName=name, Strategy="cluster",
            TagSpecifications=[{"ResourceType": "placement-group", "Tags": [
                {"Key": k, "Value": v} for k, v in _tags(cfg).items()]}])
        progress(f"created cluster placement group {name}")
        return name
    if group.get("Strategy") != "cluster":
        raise BatchDriftError(f"placement group {name} exists with strategy "
                              f"{group.get('Strategy')}, not cluster: delete it or rename "
                              "the environment (name:)")
    return name


def _ensure_launch_template(ec2: Any, cfg: BatchMnpConfig, progress: Progress) -> str:
    name = cfg.resource_names()["launch_template"]
    data = launch_template_data(cfg)
    digest = _sha256(data)
    try:
        lt = ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"][0]
    except ClientError as e:
        if _code(e) not in ("InvalidLaunchTemplateName.NotFoundException",
                            "InvalidLaunchTemplateId.NotFound"):
            raise
        tags = [{"Key": k, "Value": v} for k, v in {**_tags(cfg), HASH_TAG: digest}.items()]
        lt = ec2.create_launch_template(
            LaunchTemplateName=name, LaunchTemplateData=data,
            VersionDescription="clusterflow EFA launch template",
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": tags}],
        )["LaunchTemplate"]
        progress(f"created launch template {name} ({cfg.efa_devices} EFA interface(s))")
        return str(lt["LaunchTemplateId"])
    current = {t["Key"]: t["Value"] for t in lt.get("Tags", [])}.get(HASH_TAG)
    if current != digest:
        raise BatchDriftError(f"launch template {name} exists with other settings than "
                              f"{cfg.name}'s config: delete the environment first "
                              "(infra.clusters.batch.delete_environment) or rename it (name:)")
    return str(lt["LaunchTemplateId"])


def _ensure_compute_environment(batch: Any, cfg: BatchMnpConfig, lt: str, pg: str,
                                progress: Progress, timeout: float) -> str:
    name = cfg.resource_names()["compute_environment"]
    want = compute_resources(cfg, lt, pg)
    ce = _describe_ce(batch, name)
    if ce is None:
        kwargs: dict[str, Any] = {
            "computeEnvironmentName": name, "type": "MANAGED", "state": "ENABLED",
            "computeResources": want, "tags": _tags(cfg)}
        if cfg.service_role:
            kwargs["serviceRole"] = cfg.service_role
        batch.create_compute_environment(**kwargs)
        progress(f"created compute environment {name} (0-{want['maxvCpus']} vCPUs of "
                 f"{cfg.instance_type})")
    else:
        have = ce.get("computeResources", {})
        keys = ("type", "instanceTypes", "subnets", "securityGroupIds", "placementGroup",
                "maxvCpus")
        drift = [f"{k}: {have.get(k)!r} -> {want[k]!r}" for k in keys
                 if _norm(have.get(k)) != _norm(want[k])]
        if drift:
            raise BatchDriftError(f"compute environment {name} exists with other settings ("
                                  f"{'; '.join(drift)}): delete the environment first or rename "
                                  "it (name:)")
    ce = _wait(lambda: _describe_ce(batch, name), f"compute environment {name}",
               timeout=timeout, progress=progress,
               ready=lambda e: e.get("status") == "VALID")
    if ce is None:
        raise BatchError(f"compute environment {name} disappeared while being created")
    if ce.get("state") != "ENABLED":
        batch.update_compute_environment(computeEnvironment=name, state="ENABLED")
    return str(ce["computeEnvironmentArn"])


def _norm(v: Any) -> Any:
    return sorted(v) if isinstance(v, list) else v


def _ensure_job_queue(batch: Any, cfg: BatchMnpConfig, ce_arn: str, progress: Progress,
                      timeout: float) -> str:
    name = cfg.resource_names()["job_queue"]
    q = _describe_queue(batch, name)
    if q is None:
        batch.create_job_queue(jobQueueName=name, state="ENABLED", priority=1,
                               computeEnvironmentOrder=[{"order": 1,
                                                         "computeEnvironment": ce_arn}],
                               tags=_tags(cfg))
        progress(f"created job queue {name}")
    else:
        envs = [o["computeEnvironment"] for o in q.get("computeEnvironmentOrder", [])]
        if envs != [ce_arn]:
            raise BatchDriftError(f"job queue {name} exists on {envs}, not {ce_arn}: delete "
                                  "the environment first or rename it (name:)")
    q = _wait(lambda: _describe_queue(batch, name), f"job queue {name}", timeout=timeout,
              progress=progress, ready=lambda x: x.get("status") == "VALID")
    if q is None:
        raise BatchError(f"job queue {name} disappeared while being created")
    if q.get("state") != "ENABLED":
        batch.update_job_queue(jobQueue=name, state="ENABLED")
    return str(q["jobQueueArn"])


def _ensure_job_definition(batch: Any, cfg: BatchMnpConfig, progress: Progress) -> str:
    body = job_definition_request(cfg)
    digest = _sha256(body)
    found = batch.describe_job_definitions(jobDefinitionName=body["jobDefinitionName"],
                                           status="ACTIVE")["jobDefinitions"]
    for jd in sorted(found, key=lambda d: d["revision"], reverse=True):
        if jd.get("tags", {}).get(HASH_TAG) == digest:
            return str(jd["jobDefinitionArn"])
    arn = batch.register_job_definition(**body, tags={**_tags(cfg), HASH_TAG: digest})[
        "jobDefinitionArn"]
    progress(f"registered job definition {arn}")
    return str(arn)


def ensure_environment(aws: AwsTarget, cfg: BatchMnpConfig, *, progress: Progress = _quiet,
                       timeout: float = 900.0, source: str = "<config>") -> BatchEnvironment:
    """Converge on the MNP environment; safe to call before every run."""
    preflight(aws, cfg, source)
    ec2, batch = aws.client("ec2"), aws.client("batch")
    pg = _ensure_placement_group(ec2, cfg, progress)
    lt_id = _ensure_launch_template(ec2, cfg, progress)
    ce = _ensure_compute_environment(batch, cfg, cfg.resource_names()["launch_template"], pg,
                                     progress, timeout)
    queue = _ensure_job_queue(batch, cfg, ce, progress, timeout)
    jd = _ensure_job_definition(batch, cfg, progress)
    return BatchEnvironment(cfg, pg, lt_id, ce, queue, jd)


def delete_environment(aws: AwsTarget, cfg: BatchMnpConfig, *, progress: Progress = _quiet,
                       timeout: float = 900.0) -> list[str]:
    """Remove everything ``ensure_environment`` created, in dependency order; idempotent."""
    names = cfg.resource_names()
    ec2, batch = aws.client("ec2"), aws.client("batch")
    deleted: list[str] = []
    for kind, describe, update, delete, key in (
        ("job queue", _describe_queue, batch.update_job_queue, batch.delete_job_queue,
         "jobQueue"),
        ("compute environment", _describe_ce, batch.update_compute_environment,
         batch.delete_compute_environment, "computeEnvironment"),
    ):
        name = names["job_queue" if kind == "job queue" else "compute_environment"]
        item = describe(batch, name)
        if item is None:
            continue
        if item.get("state") != "DISABLED":
            update(**{key: name, "state": "DISABLED"})
        _wait(lambda d=describe, n=name: d(batch, n), f"{kind} {name}", timeout=timeout,
              progress=progress, invalid_ok=True,
              ready=lambda x: x.get("status") in ("VALID", "INVALID") and
              x.get("state") == "DISABLED")
        delete(**{key: name})
        _wait(lambda d=describe, n=name: d(batch, n), f"{kind} {name}", timeout=timeout,
              progress=progress, invalid_ok=True, ready=lambda x: False)
        deleted.append(f"{kind} {name}")
    for jd in batch.describe_job_definitions(jobDefinitionName=names["job_definition"],
                                             status="ACTIVE")["jobDefinitions"]:
        batch.deregister_job_definition(jobDefinition=jd["jobDefinitionArn"])
        deleted.append(f"job definition {jd['jobDefinitionArn']}")
    templates = ec2.describe_launch_templates(Filters=[
        {"Name": "launch-template-name", "Values": [names["launch_template"]]}])
    for lt in templates["LaunchTemplates"]:
        ec2.delete_launch_template(LaunchTemplateId=lt["LaunchTemplateId"])
        deleted.append(f"launch template {names['launch_template']}")
    deadline = time.monotonic() + timeout
    while True:  # the group is in use until the environment's instances have terminated
        try:
            ec2.delete_placement_group(GroupName=names["placement_group"])
            deleted.append(f"placement group {names['placement_group']}")
            break
        except ClientError as e:
            if _code(e) == "InvalidPlacementGroup.Unknown":
                break
            if _code(e) != "InvalidPlacementGroup.InUse" or time.monotonic() > deadline:
                raise
            time.sleep(10)
    for item in deleted:
        progress(f"deleted {item}")
    return deleted
