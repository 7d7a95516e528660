"""Every AWS resource a run would touch, each marked create / reuse / delete, read-only.

Each check is the describe/get call the provisioning code itself makes before it creates
(``head_bucket``, ``describe_rule``, ``get_queue_url``, ``describe_compute_environments``,
pcluster's ``describe_cluster``...), so "reuse" means what the run would really do. Nothing
here creates, updates or deletes. A check that cannot be made (no endpoint, no credentials,
access denied, an API the endpoint lacks) is reported as ``unchecked`` with the reason, never
guessed.

``at_end`` says what happens to the resource when the run ends: ``kept``, ``deleted`` (by
``teardown``) or ``snapshot`` (an EBS volume with ``DeletionPolicy: Snapshot``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from flows.spec import PipelineSpec
    from infra.aws.clients import AwsTarget


@dataclass
class Resource:
    kind: str
    name: str
    action: str  # create | reuse | delete | unchecked
    note: str = ""
    at_end: str = "kept"


class _Checker:
    """Runs existence checks against ``aws``; with ``aws=None`` records why it could not."""

    def __init__(self, aws: AwsTarget | None, offline_reason: str, fresh: bool = False) -> None:
        self.aws, self.offline_reason, self.fresh = aws, offline_reason, fresh

    def action(self, exists: Callable[[AwsTarget], bool | None], *,
               absent: str = "create", present: str = "reuse") -> tuple[str, str]:
        if self.fresh:  # a run on a fresh embedded endpoint: nothing exists before it
            return absent, ""
        if self.aws is None:  # the plan says why once, at the top
            return "unchecked", ""
        try:
            found = exists(self.aws)
        except (ClientError, BotoCoreError) as e:
            return "unchecked", f"could not check: {type(e).__name__}: {e}"
        except Exception as e:  # pcluster.lib wraps everything in its own exceptions
            return "unchecked", f"could not check: {type(e).__name__}: {e}"
        if found is None:
            return "unchecked", "could not check"
        return (present if found else absent), ""


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _bucket_exists(name: str) -> Callable[[AwsTarget], bool]:
    def check(aws: AwsTarget) -> bool:
        try:
            aws.client("s3").head_bucket(Bucket=name)
        except ClientError as e:
            if _code(e) in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise
        return True
    return check


def _rule_exists(name: str) -> Callable[[AwsTarget], bool]:
    def check(aws: AwsTarget) -> bool:
        try:
            aws.client("events").describe_rule(Name=name)
        except ClientError as e:
            if _code(e) == "ResourceNotFoundException":
                return False
            raise
        return True
    return check


def _legacy_rule_is_ours(topo: Any) -> Callable[[AwsTarget], bool]:
    def check(aws: AwsTarget) -> bool:
        events = aws.client("events")
        if not _rule_exists(topo.legacy_rule_name)(aws):
            return False
        targets = events.list_targets_by_rule(Rule=topo.legacy_rule_name)["Targets"]
        return [(t["Id"], t["Arn"].rsplit(":", 1)[-1]) for t in targets] == [
            ("fanout-topic", topo.topic)]
    return check


def fanout_resources(spec: PipelineSpec, check: _Checker) -> list[Resource]:
    """Buckets and the fan-out (rule -> topic -> queues with DLQs) that ``provision`` applies."""
    from event_bridge.ensure_queues import queue_url_or_none
    from event_bridge.ensure_topics import find_topic
    from event_bridge.fabric import QueueSpec
    from flows.pipeline import fanout_topology

    out = []
    for bucket in dict.fromkeys((spec.storage.input_bucket, spec.storage.results_bucket)):
        out.append(Resource("s3 bucket", bucket, *check.action(_bucket_exists(bucket)),
                            at_end="kept"))
    topo = fanout_topology(spec)
    out.append(Resource("eventbridge rule", topo.rule_name,
                        *check.action(_rule_exists(topo.rule_name)), at_end="kept"))
    if topo.legacy_rule_name != topo.rule_name:
        action, note = check.action(_legacy_rule_is_ours(topo), absent="", present="delete")
        if action:  # only listed when it exists (or could not be checked)
            out.append(Resource("eventbridge rule", topo.legacy_rule_name, action,
                                at_end="deleted", note=note or "the old shared fan-out rule "
                                "(deleted if it exists), replaced by the per-bucket one"))
    out.append(Resource("sns topic", topo.topic, *check.action(
        lambda aws: find_topic(aws.client("sns"), topo.topic) is not None), at_end="kept"))
    for q in topo.queues:
        for name in (q, QueueSpec(name=q).dlq_name):
            out.append(Resource("sqs queue", name, *check.action(
                lambda aws, n=name: queue_url_or_none(aws.client("sqs"), n) is not None),
                at_end="kept"))
    return out


def parallelcluster_resources(spec: PipelineSpec, check: _Checker) -> list[Resource]:
    """The cluster, its queues and the storage ParallelCluster creates with it."""
    from infra.clusters.parallelcluster import ParallelCluster
    from infra.clusters.parallelcluster_validate import config_region, load_cluster_config

    s = spec.parallelcluster
    raw = load_cluster_config(s.config).raw
    region = config_region(raw, spec.region)

    def cluster_exists(aws: AwsTarget) -> bool:
        target = dataclasses.replace(aws, region=region)
        return ParallelCluster(s.cluster_name, target).describe() is not None

    action, note = check.action(cluster_exists)
    gone = s.teardown == "after_run"
    end = "deleted" if gone else "kept"
    if s.teardown not in ("after_run", "never"):
        end = "deleted when idle"
    out = [Resource("parallelcluster cluster", f"{s.cluster_name} ({region})", action,
                    at_end=end, note=note or f"from {s.config}, head node "
                    f"{raw['HeadNode']['InstanceType']}")]
    with_cluster = action  # queues and storage come and go with the cluster
    from flows.fsx_checks import uses_fsx

    # Run from elsewhere: the data moves through the FSx's S3 links (flows.fsx_staging,
    # flows.steps.fsx), with data repository tasks the plan names on those links.
    staged = ("; the run stages through it: import tasks (or auto-import waits) for the "
              "inputs, an export task per result folder, verified in S3 by sha256"
              if uses_fsx(spec) else "")
    for q in raw["Scheduling"]["SlurmQueues"]:
        types = ", ".join(
            f"{cr.get('InstanceType') or '/'.join(i['InstanceType'] for i in cr['Instances'])}"
            f" {cr.get('MinCount', 0)}-{cr.get('MaxCount', 10)}" for cr in q["ComputeResources"])
        used = " (the run's queue)" if q["Name"] == (s.queue or raw["Scheduling"][
            "SlurmQueues"][0]["Name"]) else ""
        out.append(Resource("slurm queue", q["Name"], with_cluster, at_end=end,
                            note=f"{q.get('CapacityType', 'ONDEMAND')}: {types}{used}"))
    for st in raw.get("SharedStorage", []):
        if st["StorageType"] == "FsxLustre":
            fsx = st.get("FsxLustreSettings", {})
            fs_id = fsx.get("FileSystemId")
            if fs_id:
                out.append(Resource("fsx lustre file system", fs_id, *check.action(
                    lambda aws, i=fs_id: bool(aws.client("fsx").describe_file_systems(
                        FileSystemIds=[i])["FileSystems"]), absent="missing"), at_end="kept"))
                continue
            policy = fsx.get("DeletionPolicy", "Delete")
            out.append(Resource(
                "fsx lustre file system", f"{st['Name']} ({fsx.get('DeploymentType')}, "
                f"{fsx.get('StorageCapacity')} GB)", with_cluster,
                at_end="deleted" if gone and policy == "Delete" else "kept",
                note=f"mounted at {st['MountDir']}" + (
                    f"; lazy load from {fsx['ImportPath']}" if fsx.get("ImportPath") else "")
                + staged))
            for dra in fsx.get("DataRepositoryAssociations", []):
                out.append(Resource("fsx data repository association",
                                    f"{dra['Name']}: {dra['FileSystemPath']} <-> "
                                    f"{dra['DataRepositoryPath']}", with_cluster,
                                    at_end="deleted" if gone and policy == "Delete" else "kept"))
        elif st["StorageType"] == "Ebs":
            ebs = st.get("EbsSettings", {})
            if ebs.get("VolumeId"):
                out.append(Resource("ebs volume", ebs["VolumeId"], "reuse", at_end="kept"))
                continue
            policy = ebs.get("DeletionPolicy", "Delete")
            end_ebs = {"Delete": "deleted", "Snapshot": "snapshot"}.get(policy, "kept")
            out.append(Resource("ebs volume", f"{st['Name']} ({ebs.get('Size', 35)} GB "
                                f"{ebs.get('VolumeType', 'gp3')})", with_cluster,
                                at_end=end_ebs if gone else "kept",
                                note=f"mounted at {st['MountDir']}"))
    return out


def batch_resources(spec: PipelineSpec, check: _Checker) -> list[Resource]:
    """The MNP environment ``ensure_environment`` converges on, in its order."""
    from infra.clusters.batch.provision import _describe_ce, _describe_queue
    from infra.clusters.batch_config import load_batch_config

    cfg = load_batch_config(spec.batch.config)
    names = cfg.resource_names()
    end = "deleted" if spec.batch.teardown == "after_run" else "kept"

    def on(region_check: Callable[[AwsTarget], bool]) -> Callable[[AwsTarget], bool]:
        return lambda aws: region_check(dataclasses.replace(aws, region=cfg.region))

    def pg(aws: AwsTarget) -> bool:
        try:
            aws.client("ec2").describe_placement_groups(GroupNames=[names["placement_group"]])
        except ClientError as e:
            if _code(e) == "InvalidPlacementGroup.Unknown":
                return False
            raise
        return True

    checks = [
        ("ec2 placement group", names["placement_group"], pg),
        ("ec2 launch template", names["launch_template"],
         lambda aws: bool(aws.client("ec2").describe_launch_templates(Filters=[
             {"Name": "launch-template-name", "Values": [names["launch_template"]]}])[
             "LaunchTemplates"])),
        ("batch compute environment", names["compute_environment"],
         lambda aws: _describe_ce(aws.client("batch"), names["compute_environment"])
         is not None),
        ("batch job queue", names["job_queue"],
         lambda aws: _describe_queue(aws.client("batch"), names["job_queue"]) is not None),
        ("batch job definition", names["job_definition"],
         lambda aws: bool(aws.client("batch").describe_job_definitions(
             jobDefinitionName=names["job_definition"], status="ACTIVE")["jobDefinitions"])),
    ]
    out = []
    for kind, name, fn in checks:
        action, note = check.action(on(fn))
        if kind == "batch compute environment" and not note:
            note = (f"MANAGED {cfg.capacity_type}, {cfg.instance_type}, 0-"
                    f"{cfg.max_nodes * cfg.node_vcpus} vCPUs ({cfg.region})")
        if kind == "batch job definition" and action == "reuse":
            note = "re-registered if its content hash differs"
        out.append(Resource(kind, name, action, at_end=end, note=note))
    return out


def inventory(spec: PipelineSpec, aws: AwsTarget | None, offline_reason: str = "", *,
              fresh: bool = False) -> list[Resource]:
    """Every resource the run would touch, in the order the run touches them.

    ``fresh``: the run would start its own empty embedded endpoint, so all is created.
    """
    check = _Checker(aws, offline_reason, fresh)
    out = fanout_resources(spec, check)
    from flows.planning.estimate import run_backends

    backends = run_backends(spec)
    if "parallelcluster" in backends and spec.parallelcluster is not None:
        out += parallelcluster_resources(spec, check)
    if "batch" in backends and spec.batch is not None:
        out += batch_resources(spec, check)
    return out
