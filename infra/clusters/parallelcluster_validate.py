"""Offline validation of ParallelCluster 3 configs: ParallelCluster's own schema, then the
mistakes that otherwise surface only after a CloudFormation stack has been running for minutes.

1. ``pcluster.schemas.cluster_schema.ClusterSchema(cluster_name=...).load(dict)``: the exact
   schema ``pcluster create-cluster`` applies (types, required fields, unknown keys, enums,
   ranges). Its nested marshmallow errors become one ``ConfigIssue`` per message with a path
   such as ``Scheduling.SlurmQueues[0].ComputeResources[0].MaxCount``.
2. clusterflow's checks (each mirrors a ParallelCluster semantic validator that needs AWS):
   - EFA enabled on an instance type without EFA (``infra/clusters/data/instance_types.json``);
   - EFA enabled without an explicit placement group setting (ParallelCluster refuses it);
   - a queue with EFA or a placement group and more than one subnet. Rule used offline:
     ParallelCluster requires the subnets of one queue to be in *different* Availability
     Zones (two subnets in one AZ are refused), so more than one subnet means more than one
     AZ, and EFA traffic and cluster placement groups do not cross AZs. When the subnet -> AZ
     map is known (given, or looked up with an ``AwsTarget``) the message names the AZs;
   - ``MaxCount`` below ``MinCount`` (defaults 10 and 0, as ParallelCluster's);
   - a GPU queue or compute resource (``gpu`` in its name, or GPU health checks enabled)
     whose instance types have no GPU;
   - flexible instance types (``Instances``) with different vCPU (or, SMT off, core) counts;
   - unknown instance types and duplicate queue / compute resource names.
3. With an ``AwsTarget``: subnets and the head node's key pair exist, and every compute
   instance type is offered in its queue's Availability Zones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.aws.clients import AwsTarget
from infra.aws.preflight import Preflight
from infra.clusters import instance_types
from infra.clusters.config_issues import (
    ConfigInvalid,
    ConfigIssue,
    flatten_marshmallow,
    load_yaml_mapping,
)

DEFAULT_MIN_COUNT = 0  # pcluster.constants.DEFAULT_MIN_COUNT
DEFAULT_MAX_COUNT = 10  # pcluster.constants.DEFAULT_MAX_COUNT
DEFAULT_REGION = "us-east-1"
_GPU_NAME = re.compile(r"gpu", re.IGNORECASE)
_env_lock = threading.Lock()


@dataclass(frozen=True)
class ComputeResourceRef:
    queue: str
    name: str
    path: str  # e.g. Scheduling.SlurmQueues[0].ComputeResources[1]
    instance_types: tuple[tuple[str, str], ...]  # (instance type, its field path)
    raw: Mapping[str, Any]


@dataclass(frozen=True)
class ValidatedCluster:
    """A config that passed every check; ``raw`` is what goes to ``pcluster.lib``."""

    source: str
    raw: dict[str, Any]
    region: str
    config: Any  # pcluster.config.cluster_config.SlurmClusterConfig

    def summary(self) -> str:
        queues = []
        for q in self.raw["Scheduling"]["SlurmQueues"]:
            parts = []
            for cr in q.get("ComputeResources", []):
                types = "/".join(t for t, _ in _instance_types(cr, ""))
                efa = " EFA" if _efa(cr) else ""
                lo, hi = cr.get("MinCount", DEFAULT_MIN_COUNT), cr.get("MaxCount",
                                                                      DEFAULT_MAX_COUNT)
                parts.append(f"{types} x{lo}-{hi}{efa}")
            pg = " PG" if _queue_placement_group(q) else ""
            queues.append(f"{q['Name']} ({q.get('CapacityType', 'ONDEMAND')}{pg}: "
                          f"{', '.join(parts)})")
        storage = []
        for s in self.raw.get("SharedStorage", []):
            kind = s.get("StorageType")
            settings = s.get(f"{kind}Settings", {})
            detail = settings.get("DeploymentType") or settings.get("DeletionPolicy") or ""
            storage.append(f"{s.get('MountDir')} {kind}{' ' + detail if detail else ''}")
        return (f"ParallelCluster config, region {self.region}, queues: {'; '.join(queues)}"
                + (f"; storage: {', '.join(storage)}" if storage else ""))


@contextlib.contextmanager
def _region_env(region: str) -> Iterator[None]:
    """ParallelCluster's schema reads the region from the environment (and refuses to load
    without one); set it for the call only, and serialize, since the environment is global."""
    with _env_lock:
        old = os.environ.get("AWS_DEFAULT_REGION")
        os.environ["AWS_DEFAULT_REGION"] = region
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("AWS_DEFAULT_REGION", None)
            else:
                os.environ["AWS_DEFAULT_REGION"] = old


def schema_load(raw: dict[str, Any], *, region: str, cluster_name: str = "clusterflow",
                ) -> tuple[Any, list[ConfigIssue]]:
    """(loaded config or None, schema issues): ParallelCluster's own schema, nothing else."""
    from marshmallow import ValidationError
    from pcluster.schemas.cluster_schema import ClusterSchema

    with _region_env(region):
        try:
            return ClusterSchema(cluster_name=cluster_name).load(raw), []
        except ValidationError as e:
            return None, list(flatten_marshmallow(e.messages))


def _instance_types(cr: Mapping[str, Any], path: str) -> list[tuple[str, str]]:
    if "InstanceType" in cr:
        return [(cr["InstanceType"], f"{path}.InstanceType")]
    return [(inst["InstanceType"], f"{path}.Instances[{k}].InstanceType")
            for k, inst in enumerate(cr.get("Instances", [])) if "InstanceType" in inst]


def _efa(cr: Mapping[str, Any]) -> bool:
    return bool(cr.get("Efa", {}).get("Enabled", False))


def _pg(networking: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return (networking or {}).get("PlacementGroup")


def _pg_enabled(pg: Mapping[str, Any] | None) -> bool:
    if not pg:
        return False
    # ParallelCluster: a placement group with an Id or Name is used even without Enabled.
    return bool(pg.get("Enabled", bool(pg.get("Id") or pg.get("Name"))))


def _queue_placement_group(q: Mapping[str, Any]) -> bool:
    if _pg_enabled(_pg(q.get("Networking"))):
        return True
    return any(_pg_enabled(_pg(cr.get("Networking"))) for cr in q.get("ComputeResources", []))


def _gpu_hint(node: Mapping[str, Any]) -> bool:
    if _GPU_NAME.search(str(node.get("Name", ""))):
        return True
    return bool(node.get("HealthChecks", {}).get("Gpu", {}).get("Enabled", False))


def compute_resources(raw: Mapping[str, Any]) -> Iterator[ComputeResourceRef]:
    for i, q in enumerate(raw.get("Scheduling", {}).get("SlurmQueues", [])):
        for j, cr in enumerate(q.get("ComputeResources", [])):
            path = f"Scheduling.SlurmQueues[{i}].ComputeResources[{j}]"
            yield ComputeResourceRef(q.get("Name", ""), cr.get("Name", ""), path,
                                     tuple(_instance_types(cr, path)), cr)


def clusterflow_checks(raw: Mapping[str, Any], subnet_azs: Mapping[str, str] | None = None,
                       ) -> list[ConfigIssue]:
    """Checks on a config that already passed the schema (so its shape is known)."""
    issues: list[ConfigIssue] = []
    catalog = instance_types.catalog()
    head = raw.get("HeadNode", {}).get("InstanceType")
    if head and head not in catalog:
        issues.append(_unknown_type("HeadNode.InstanceType", head))

    queues = raw.get("Scheduling", {}).get("SlurmQueues", [])
    if not queues:
        issues.append(ConfigIssue("Scheduling.SlurmQueues",
                                  "no queue defined: add at least one SlurmQueue"))
    seen_queues: dict[str, int] = {}
    for i, q in enumerate(queues):
        qpath = f"Scheduling.SlurmQueues[{i}]"
        if q["Name"] in seen_queues:
            issues.append(ConfigIssue(f"{qpath}.Name", f"queue name '{q['Name']}' is already "
                                      f"used by Scheduling.SlurmQueues[{seen_queues[q['Name']]}]"))
        seen_queues.setdefault(q["Name"], i)
        issues += _queue_checks(q, qpath, subnet_azs or {})
    return issues


def _unknown_type(path: str, name: str) -> ConfigIssue:
    try:
        instance_types.lookup(name)
    except instance_types.UnknownInstanceType as e:
        return ConfigIssue(path, f"{e} (if it is new, regenerate "
                                 "infra/clusters/data/instance_types.json with "
                                 "'python -m infra.clusters.instance_types')")
    raise AssertionError(name)


def _queue_checks(q: Mapping[str, Any], qpath: str, subnet_azs: Mapping[str, str],
                  ) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    catalog = instance_types.catalog()
    queue_pg = _pg(q.get("Networking"))
    gpu_queue = _gpu_hint(q)
    any_efa = False
    seen: dict[str, int] = {}
    for j, cr in enumerate(q.get("ComputeResources", [])):
        path = f"{qpath}.ComputeResources[{j}]"
        if cr["Name"] in seen:
            first = f"{qpath}.ComputeResources[{seen[cr['Name']]}]"
            issues.append(ConfigIssue(f"{path}.Name", f"compute resource name '{cr['Name']}' "
                                      f"is already used by {first}"))
        seen.setdefault(cr["Name"], j)
        types = _instance_types(cr, path)
        known = [(t, p) for t, p in types if t in catalog]
        issues += [_unknown_type(p, t) for t, p in types if t not in catalog]

        lo = cr.get("MinCount", DEFAULT_MIN_COUNT)
        hi = cr.get("MaxCount", DEFAULT_MAX_COUNT)
        if hi < lo:
            issues.append(ConfigIssue(f"{path}.MaxCount", f"MaxCount ({hi}) is less than MinCount "
                                      f"({lo}): raise MaxCount or lower MinCount"))

        if len(known) > 1:
            smt_off = cr.get("DisableSimultaneousMultithreading", False)
            unit = "CPU cores" if smt_off else "vCPUs"
            counts = {t: catalog[t].cores if smt_off else catalog[t].vcpus for t, _ in known}
            if len(set(counts.values())) > 1:
                listed = ", ".join(f"{t}: {n}" for t, n in counts.items())
                issues.append(ConfigIssue(f"{path}.Instances", f"the instance types of one compute "
                                          f"resource must have the same number of {unit} "
                                          f"({listed}): split them into separate compute "
                                          "resources"))

        if _efa(cr):
            any_efa = True
            for t, p in known:
                if not catalog[t].efa:
                    issues.append(ConfigIssue(p, f"instance type '{t}' does not support EFA "
                                              f"({path}.Efa.Enabled is true): pick an EFA type "
                                              "(e.g. hpc7a.96xlarge, c6in.32xlarge, c5n.18xlarge, "
                                              "p5.48xlarge) or disable EFA"))
            if _pg(cr.get("Networking")) is None and queue_pg is None:
                issues.append(ConfigIssue(f"{path}.Efa.Enabled", "EFA needs an explicit placement "
                                          f"group: set {qpath}.Networking.PlacementGroup.Enabled: "
                                          "true (or Enabled: false to run EFA without one)"))

        if gpu_queue or _gpu_hint(cr):
            what = (f"queue '{q['Name']}'" if gpu_queue else f"compute resource '{cr['Name']}'")
            for t, p in known:
                if not catalog[t].gpus:
                    issues.append(ConfigIssue(p, f"{what} is a GPU queue but instance type "
                                              f"'{t}' has no GPU: use a GPU type (e.g. "
                                              "p5.48xlarge, p4d.24xlarge, g6.12xlarge) or rename "
                                              "the queue"))

    subnets = list(q.get("Networking", {}).get("SubnetIds", []))
    if len(set(subnets)) > 1 and (any_efa or _queue_placement_group(q)):
        why = "EFA" if any_efa else "a cluster placement group"
        azs = {s: subnet_azs[s] for s in subnets if s in subnet_azs}
        if len(azs) == len(set(subnets)):
            where = ", ".join(f"{s} in {azs[s]}" for s in subnets)
            detail = (f"the subnets span {len(set(azs.values()))} Availability Zones ({where})"
                      if len(set(azs.values())) > 1 else
                      f"the subnets share one Availability Zone ({where}), which ParallelCluster "
                      "refuses for one queue")
        else:
            detail = ("ParallelCluster requires a queue's subnets to be in different Availability "
                      f"Zones, so {len(set(subnets))} subnets mean {len(set(subnets))} AZs")
        issues.append(ConfigIssue(f"{qpath}.Networking.SubnetIds",
                                  f"queue '{q['Name']}' uses {why}, which does not cross "
                                  f"Availability Zones, but {detail}: list exactly one subnet"))
    return issues


def aws_checks(raw: Mapping[str, Any], preflight: Preflight) -> tuple[list[ConfigIssue],
                                                                    dict[str, str]]:
    """Existence of subnets and key pair, instance type offerings per AZ."""
    issues: list[ConfigIssue] = []
    refs: list[tuple[str, str]] = []
    head_subnet = raw.get("HeadNode", {}).get("Networking", {}).get("SubnetId")
    if head_subnet:
        refs.append((head_subnet, "HeadNode.Networking.SubnetId"))
    queues = raw.get("Scheduling", {}).get("SlurmQueues", [])
    for i, q in enumerate(queues):
        for k, s in enumerate(q.get("Networking", {}).get("SubnetIds", [])):
            refs.append((s, f"Scheduling.SlurmQueues[{i}].Networking.SubnetIds[{k}]"))
    azs = preflight.subnet_azs(s for s, _ in refs)
    issues += [ConfigIssue(p, preflight.missing_subnet_message(s)) for s, p in refs
               if s not in azs]

    key = raw.get("HeadNode", {}).get("Ssh", {}).get("KeyName")
    if key and not preflight.key_pair_exists(key):
        issues.append(ConfigIssue("HeadNode.Ssh.KeyName", preflight.missing_key_pair_message(key)))

    catalog = instance_types.catalog()
    for i, q in enumerate(queues):
        subnets = [s for s in q.get("Networking", {}).get("SubnetIds", []) if s in azs]
        for j, cr in enumerate(q.get("ComputeResources", [])):
            path = f"Scheduling.SlurmQueues[{i}].ComputeResources[{j}]"
            for t, p in _instance_types(cr, path):
                if t not in catalog:
                    continue
                for s in subnets:
                    if azs[s] not in preflight.offered_in(t):
                        issues.append(ConfigIssue(p, preflight.not_offered_message(t, azs[s], s)))
    return issues, azs


def config_region(raw: Mapping[str, Any], region: str | None = None) -> str:
    return str(raw.get("Region") or region or os.environ.get("AWS_DEFAULT_REGION")
               or DEFAULT_REGION)


def validate_cluster_config(raw: dict[str, Any], *, source: str = "<config>",
                            cluster_name: str = "clusterflow", region: str | None = None,
                            subnet_azs: Mapping[str, str] | None = None,
                            aws: AwsTarget | None = None) -> ValidatedCluster:
    """Every problem at once, or a ``ValidatedCluster``; raises ``ConfigInvalid``.

    ``aws`` adds the account look-ups (in the config's region, through the same endpoint).
    """
    region = config_region(raw, region)
    loaded, issues = schema_load(raw, region=region, cluster_name=cluster_name)
    if issues:  # the shape is unknown; further checks would only add noise
        raise ConfigInvalid(source, issues)
    azs = dict(subnet_azs or {})
    if aws is not None:
        target = dataclasses.replace(aws, region=region)
        online, found = aws_checks(raw, Preflight(target))
        issues += online
        azs.update(found)
    issues = clusterflow_checks(raw, azs) + issues
    if issues:
        raise ConfigInvalid(source, issues)
    return ValidatedCluster(source=source, raw=raw, region=region, config=loaded)


def is_parallelcluster_config(raw: Mapping[str, Any]) -> bool:
    return any(k in raw for k in ("HeadNode", "Scheduling", "Image"))


def load_cluster_config(path: Path | str, **kwargs: Any) -> ValidatedCluster:
    path = Path(path)
    return validate_cluster_config(load_yaml_mapping(path), source=str(path), **kwargs)
