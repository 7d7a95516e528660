"""AWS Batch multi-node parallel (MNP) with EFA: the control plane, idempotently.

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

import base64
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from infra.aws.clients import AwsTarget
from infra.aws.preflight import Preflight
from infra.backends.providers.base import JobState
from infra.backends.shell_safety import safe_arg
from infra.clusters.batch_config import (
    MAX_NODE_GROUPS,
    MAX_NODES,
    BatchMnpConfig,
    Volume,
    aws_issues,
    instance_issues,
    subnet_issues,
)
from infra.clusters.config_issues import ConfigInvalid

Progress = Callable[[str], None]
HASH_TAG = "clusterflow:sha256"
CANCEL_REASON = "cancelled by clusterflow"
JOB_NAME_RE = re.compile(r"[^A-Za-z0-9_-]")
PENDING_STATES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING")


class BatchError(RuntimeError):
    """AWS Batch refused or failed something; the message says what and what to do."""


class BatchLimitError(BatchError):
    """A documented AWS Batch multi-node limit would be exceeded."""


class BatchDriftError(BatchError):
    """A resource with clusterflow's name exists with different settings."""


@dataclass(frozen=True)
class BatchEnvironment:
    config: BatchMnpConfig
    placement_group: str
    launch_template_id: str
    compute_environment_arn: str
    job_queue_arn: str
    job_definition_arn: str


def _quiet(_: str) -> None:
    pass


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _sha256(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _tags(cfg: BatchMnpConfig) -> dict[str, str]:
    return {"clusterflow:environment": cfg.name, **cfg.tags}


# ---------------------------------------------------------------- request bodies (pure)


def fsx_user_data(cfg: BatchMnpConfig) -> str | None:
    """MIME multipart user data (the form Batch requires) that mounts FSx for Lustre."""
    if cfg.fsx is None:
        return None
    f = cfg.fsx
    script = "\n".join([
        "#!/bin/bash",
        "set -euo pipefail",
        "dnf install -y lustre-client 2>/dev/null || amazon-linux-extras install -y lustre",
        f"mkdir -p {safe_arg(f.mount_point, 'fsx.mount_point')}",
        "mount -t lustre -o relatime,flock "
        f"{safe_arg(f'{f.dns_name}@tcp:/{f.mount_name}', 'fsx.dns_name/mount_name')} "
        f"{safe_arg(f.mount_point, 'fsx.mount_point')}",
    ])
    boundary = "==CLUSTERFLOW=="
    doc = (f'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="{boundary}"\n\n'
           f'--{boundary}\nContent-Type: text/x-shellscript; charset="us-ascii"\n\n'
           f"{script}\n\n--{boundary}--\n")
    return base64.b64encode(doc.encode()).decode()


def launch_template_data(cfg: BatchMnpConfig) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if cfg.efa:
        # One EFA per network card (the instance type's maximum unless efa_interfaces says
        # fewer); card 0 carries the primary interface, the others device index 1.
        data["NetworkInterfaces"] = [
            {"NetworkCardIndex": i, "DeviceIndex": 0 if i == 0 else 1, "InterfaceType": "efa",
             "Groups": list(cfg.security_group_ids), "DeleteOnTermination": True,
             "Description": f"{cfg.name} EFA {i}"}
            for i in range(cfg.efa_devices)
        ]
    user_data = fsx_user_data(cfg)
    if user_data:
        data["UserData"] = user_data
    return data


def compute_resources(cfg: BatchMnpConfig, launch_template: str, placement_group: str,
                      ) -> dict[str, Any]:
    cr: dict[str, Any] = {
        "type": "EC2",
        "allocationStrategy": "BEST_FIT_PROGRESSIVE",
        "minvCpus": 0,
        "desiredvCpus": 0,
        "maxvCpus": cfg.max_nodes * cfg.instance.vcpus,
        "instanceTypes": [cfg.instance_type],
        "subnets": list(cfg.subnets),
        "securityGroupIds": list(cfg.security_group_ids),
        "instanceRole": cfg.instance_role,
        "placementGroup": placement_group,
        "launchTemplate": {"launchTemplateName": launch_template, "version": "$Latest"},
        "tags": _tags(cfg),
    }
    if cfg.key_pair:
        cr["ec2KeyPair"] = cfg.key_pair
    if cfg.image_id:
        cr["imageId"] = cfg.image_id
    return cr


def _container(cfg: BatchMnpConfig, command: list[str]) -> dict[str, Any]:
    c = cfg.container
    resources = [{"type": "VCPU", "value": str(cfg.node_vcpus)},
                 {"type": "MEMORY", "value": str(cfg.node_memory_mib)}]
    if c.gpus:
        resources.append({"type": "GPU", "value": str(c.gpus)})
    env = {"CLUSTERFLOW_SLOTS_PER_NODE": str(cfg.slots_per_node), **c.environment}
    if cfg.efa:
        env.setdefault("FI_PROVIDER", "efa")
    body: dict[str, Any] = {
        "image": c.image,
        "command": command,
        "instanceType": cfg.instance_type,
        "resourceRequirements": resources,
        "environment": [{"name": k, "value": v} for k, v in sorted(env.items())],
        # EFA registers memory with the NIC; a capped memlock makes libfabric fail at start.
        "ulimits": [{"name": "memlock", "softLimit": -1, "hardLimit": -1}],
        "linuxParameters": {"devices": [
            {"hostPath": f"/dev/infiniband/uverbs{i}",
             "containerPath": f"/dev/infiniband/uverbs{i}",
             "permissions": ["READ", "WRITE", "MKNOD"]}
            for i in range(cfg.efa_devices)
        ]},
    }
    volumes = list(c.volumes)
    if cfg.fsx and not any(v.host_path == cfg.fsx.mount_point for v in volumes):
        volumes.append(Volume(host_path=cfg.fsx.mount_point,
                              container_path=cfg.fsx.mount_point))
    if volumes:
        body["volumes"] = [{"name": f"vol{i}", "host": {"sourcePath": v.host_path}}
                           for i, v in enumerate(volumes)]
        body["mountPoints"] = [{"sourceVolume": f"vol{i}", "containerPath": v.container_path,
                                "readOnly": v.read_only} for i, v in enumerate(volumes)]
    if c.user:
        body["user"] = c.user
    return body


def node_properties(cfg: BatchMnpConfig, num_nodes: int = 2) -> dict[str, Any]:
    entry = list(cfg.container.entry)
    props = {
        "numNodes": num_nodes,
        "mainNode": 0,
        "nodeRangeProperties": [
            # The main node's real command (mpirun ...) comes with each submission.
            {"targetNodes": "0:0", "container": _container(cfg, [*entry, "--", "true"])},
            {"targetNodes": "1:", "container": _container(cfg, entry)},
        ],
    }
    check_node_properties(props)
    return props


def _node_range(spec: str, num_nodes: int) -> tuple[int, int]:
    start, sep, end = spec.partition(":")
    if not sep:
        lo = hi = int(start)
    else:
        lo = int(start) if start else 0
        hi = int(end) if end else num_nodes - 1
    return lo, hi


def check_node_properties(props: Mapping[str, Any],
                          overrides: Sequence[Mapping[str, Any]] = ()) -> None:
    """Batch's documented MNP limits, checked before any request is sent."""
    n = int(props["numNodes"])
    if not 1 <= n <= MAX_NODES:
        raise BatchLimitError(f"{n} nodes: an AWS Batch multi-node job has 1 to {MAX_NODES} "
                              "nodes (the default instance limit of its ECS cluster)")
    ranges = list(props["nodeRangeProperties"])
    if len(ranges) > MAX_NODE_GROUPS:
        raise BatchLimitError(f"{len(ranges)} node groups: AWS Batch allows at most "
                              f"{MAX_NODE_GROUPS} per multi-node job; merge groups that share "
                              "a container")
    types = {r["container"].get("instanceType") for r in ranges} | {
        o.get("containerOverrides", {}).get("instanceType") for o in overrides} - {None}
    if len(types) > 1:
        raise BatchLimitError(f"instance types {sorted(types)}: all node groups of an AWS Batch "
                              "multi-node job must use the same instance type")
    covered: list[int] = []
    for r in ranges:
        lo, hi = _node_range(r["targetNodes"], n)
        if lo > hi or hi >= n:
            raise BatchLimitError(f"node range '{r['targetNodes']}' does not fit {n} nodes "
                                  f"(indexes 0 to {n - 1})")
        covered += range(lo, hi + 1)
    if sorted(covered) != list(range(n)):
        raise BatchLimitError(f"node ranges {[r['targetNodes'] for r in ranges]} must cover "
                              f"every node 0 to {n - 1} exactly once")


def job_definition_request(cfg: BatchMnpConfig) -> dict[str, Any]:
    body: dict[str, Any] = {
        "jobDefinitionName": cfg.resource_names()["job_definition"],
        "type": "multinode",
        "nodeProperties": node_properties(cfg),
        "retryStrategy": {"attempts": cfg.attempts},
        "platformCapabilities": ["EC2"],
        "propagateTags": True,
    }
    if cfg.timeout_minutes:
        body["timeout"] = {"attemptDurationSeconds": cfg.timeout_minutes * 60}
    return body


def nodes_for(cfg: BatchMnpConfig, ranks: int) -> int:
    """Nodes for ``ranks`` at ``slots_per_node`` each; refused outside what MNP can run."""
    nodes = math.ceil(ranks / cfg.slots_per_node)
    if nodes < 2:
        raise BatchLimitError(
            f"{ranks} ranks fit on one {cfg.instance_type} ({cfg.slots_per_node} ranks per node) "
            "but a multi-node job has at least 2 nodes (main + workers): raise ranks above "
            f"{cfg.slots_per_node}, lower ranks_per_node, or use the local or parallelcluster "
            "backend")
    if nodes > min(cfg.max_nodes, MAX_NODES):
        raise BatchLimitError(
            f"{ranks} ranks need {nodes} nodes of {cfg.slots_per_node} ranks but the "
            f"environment allows {min(cfg.max_nodes, MAX_NODES)} (max_nodes; AWS Batch's limit "
            f"is {MAX_NODES}): lower ranks or raise max_nodes")
    return nodes


# ---------------------------------------------------------------- provisioning


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


# ---------------------------------------------------------------- jobs


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
