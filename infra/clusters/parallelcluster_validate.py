"""Offline validation of ParallelCluster 3 configs: ParallelCluster's own schema, then the
mistakes that otherwise surface only after a CloudFormation stack has been running for minutes.

1. ``pcluster.schemas.cluster_schema.ClusterSchema(cluster_name=...).load(dict)``: the exact
   schema ``pcluster create-cluster`` applies (types, required fields, unknown keys, enums,
   ranges). Its nested marshmallow errors become one ``ConfigIssue`` per message with a path
   such as ``Scheduling.SlurmQueues[0].ComputeResources[0].MaxCount``.
2. clusterflow's checks (``infra.clusters.parallelcluster_checks``): ParallelCluster's semantic
   validators that need AWS (EFA support, placement groups, multi-AZ queues, counts, flexible
   instance types, names), applied offline with ParallelCluster's own verdicts: an ERROR there
   is an error here, a WARNING a warning.
3. With an ``AwsTarget``: subnets and the head node's key pair exist, and every compute
   instance type is offered in its queue's Availability Zones.

Offline means no network at all: loading a config makes ParallelCluster cache its capacity
reservations (``SlurmClusterConfig.__init__`` calls EC2 ``DescribeCapacityReservations`` and,
for a ``CapacityReservationResourceGroupArn``, Resource Groups ``ListGroupResources``), so the
schema is loaded with ParallelCluster's AWS layer swapped for `_OfflineAWSApi`, which answers
those lookups with nothing and refuses every other call without sending it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.aws.clients import AwsTarget
from infra.aws.preflight import Preflight
from infra.aws.regions import region_problem
from infra.clusters import instance_types
from infra.clusters.config_issues import (
    ConfigInvalid,
    ConfigIssue,
    flatten_marshmallow,
    load_yaml_mapping,
)
from infra.clusters.parallelcluster_checks import (
    DEFAULT_MAX_COUNT,
    DEFAULT_MIN_COUNT,
    ComputeResourceRef,
    clusterflow_checks,
    compute_resources,
    efa_enabled,
    instance_types_of,
    queue_uses_placement_group,
)

DEFAULT_REGION = "us-east-1"
_env_lock = threading.Lock()
__all__ = ["ComputeResourceRef", "ValidatedCluster", "aws_checks", "clusterflow_checks",
           "compute_resources", "load_cluster_config", "schema_load", "validate_cluster_config"]


@dataclass(frozen=True)
class ValidatedCluster:
    """A config that passed every check; ``raw`` is what goes to ``pcluster.lib``."""

    source: str
    raw: dict[str, Any]
    region: str
    config: Any  # pcluster.config.cluster_config.SlurmClusterConfig
    warnings: tuple[ConfigIssue, ...] = ()

    def summary(self) -> str:
        queues = []
        for q in self.raw["Scheduling"]["SlurmQueues"]:
            parts = []
            for cr in q.get("ComputeResources", []):
                types = "/".join(t for t, _ in instance_types_of(cr, ""))
                efa = " EFA" if efa_enabled(cr) else ""
                lo, hi = cr.get("MinCount", DEFAULT_MIN_COUNT), cr.get("MaxCount",
                                                                      DEFAULT_MAX_COUNT)
                parts.append(f"{types} x{lo}-{hi}{efa}")
            pg = " PG" if queue_uses_placement_group(q) else ""
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


class _OfflineLookups:
    """The two look-ups ``SlurmClusterConfig.__init__`` makes to warm a cache, answered with
    nothing (its ``try/except AWSClientError`` is there for when they fail; an empty answer
    keeps it quiet). Anything else ParallelCluster asks raises ``AWSClientError`` unsent."""

    def __init__(self, service: str) -> None:
        self._service = service

    def describe_capacity_reservations(self, capacity_reservation_ids: list[str]) -> list[Any]:
        return []

    def get_capacity_reservation_ids_from_group_resources(self, group: str) -> list[str]:
        return []

    def __getattr__(self, name: str) -> Any:
        from pcluster.aws.common import AWSClientError

        def refuse(*_: Any, **__: Any) -> Any:
            raise AWSClientError(f"{self._service}.{name}",
                                 "offline validation makes no AWS calls")
        return refuse


class _OfflineAWSApi:
    """Stands in for ``pcluster.aws.aws_api.AWSApi.instance()`` while the schema loads."""

    def __init__(self, region: str) -> None:
        self.aws_region = region

    def __getattr__(self, service: str) -> _OfflineLookups:
        return _OfflineLookups(service)


@contextlib.contextmanager
def _offline_pcluster(region: str) -> Iterator[None]:
    """No network from ParallelCluster: its AWS layer is one singleton behind the static
    ``AWSApi.instance()``; swap it for the call (under ``_env_lock``, like the environment)."""
    from pcluster.aws.aws_api import AWSApi

    original = AWSApi.__dict__["instance"]
    offline = _OfflineAWSApi(region)
    AWSApi.instance = staticmethod(lambda: offline)  # type: ignore[method-assign]
    try:
        yield
    finally:
        AWSApi.instance = original  # type: ignore[method-assign]


def schema_load(raw: dict[str, Any], *, region: str, cluster_name: str = "clusterflow",
                ) -> tuple[Any, list[ConfigIssue]]:
    """(loaded config or None, schema issues): ParallelCluster's own schema, nothing else,
    and no network."""
    from marshmallow import ValidationError
    from pcluster.schemas.cluster_schema import ClusterSchema

    with _region_env(region), _offline_pcluster(region):
        try:
            return ClusterSchema(cluster_name=cluster_name).load(raw), []
        except ValidationError as e:
            return None, list(flatten_marshmallow(e.messages))


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

    known = instance_types.known_names()  # offerings are looked up by name: no facts needed
    for i, q in enumerate(queues):
        subnets = [s for s in q.get("Networking", {}).get("SubnetIds", []) if s in azs]
        for j, cr in enumerate(q.get("ComputeResources", [])):
            path = f"Scheduling.SlurmQueues[{i}].ComputeResources[{j}]"
            for t, p in instance_types_of(cr, path):
                if t not in known:
                    continue
                for s in subnets:
                    if azs[s] not in preflight.offered_in(t):
                        issues.append(ConfigIssue(p, preflight.not_offered_message(t, azs[s], s)))
    return issues, azs


def config_region(raw: Mapping[str, Any], region: str | None = None) -> str:
    return str(raw.get("Region") or region or os.environ.get("AWS_DEFAULT_REGION")
               or DEFAULT_REGION)


def region_issue(raw: Mapping[str, Any], region: str | None = None) -> ConfigIssue | None:
    """The region the config will use, checked before anything reaches botocore (which would
    raise ``InvalidRegionError`` for a placeholder such as ``{{ region }}``)."""
    if raw.get("Region") is not None:
        where, value = "Region", raw["Region"]
    else:
        where, value = "<region>", config_region(raw, region)  # --region or AWS_DEFAULT_REGION
    problem = region_problem(value)
    return ConfigIssue(where, problem) if problem else None


def validate_cluster_config(raw: dict[str, Any], *, source: str = "<config>",
                            cluster_name: str = "clusterflow", region: str | None = None,
                            subnet_azs: Mapping[str, str] | None = None,
                            aws: AwsTarget | None = None) -> ValidatedCluster:
    """Every problem at once, or a ``ValidatedCluster``; raises ``ConfigInvalid``.

    ``aws`` adds the account look-ups (in the config's region, through the same endpoint).
    """
    bad_region = region_issue(raw, region)
    if bad_region:  # nothing below may see it: botocore raises on a malformed one
        raise ConfigInvalid(source, [bad_region])
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
    errors = [i for i in issues if i.level != "warning"]
    warnings = tuple(i for i in issues if i.level == "warning")
    if errors:
        raise ConfigInvalid(source, errors, warnings)
    return ValidatedCluster(source=source, raw=raw, region=region, config=loaded,
                            warnings=warnings)


def is_parallelcluster_config(raw: Mapping[str, Any]) -> bool:
    return any(k in raw for k in ("HeadNode", "Scheduling", "Image"))


def load_cluster_config(path: Path | str, **kwargs: Any) -> ValidatedCluster:
    path = Path(path)
    return validate_cluster_config(load_yaml_mapping(path), source=str(path), **kwargs)
