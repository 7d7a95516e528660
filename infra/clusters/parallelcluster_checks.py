"""clusterflow's checks on a ParallelCluster 3 config that passed ParallelCluster's schema: the
rules ParallelCluster's semantic validators apply with AWS calls, applied offline with the
shipped instance catalog, and with ParallelCluster's verdicts (error or warning) and its
resolution of queue- versus compute-resource-level settings.

The referee is ParallelCluster 3.16.1's own source (``pcluster/config/cluster_config.py`` and
``pcluster/validators/*.py``); each rule names the class it follows. Where ParallelCluster has no
validator (a GPU health check on a type without GPUs) clusterflow says a warning, never an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from infra.clusters import instance_types
from infra.clusters.config_issues import ConfigIssue, warning

DEFAULT_MIN_COUNT = 0  # pcluster.constants.DEFAULT_MIN_COUNT
DEFAULT_MAX_COUNT = 10  # pcluster.constants.DEFAULT_MAX_COUNT
CAPACITY_BLOCK = "CAPACITY_BLOCK"  # pcluster.config.cluster_config.CapacityType
_GPU_NAME = re.compile(r"gpu", re.IGNORECASE)
REGENERATE = ("if it is new, regenerate infra/clusters/data/instance_types.json with "
              "'python -m infra.clusters.instance_types'")


@dataclass(frozen=True)
class ComputeResourceRef:
    queue: str
    name: str
    path: str  # e.g. Scheduling.SlurmQueues[0].ComputeResources[1]
    instance_types: tuple[tuple[str, str], ...]  # (instance type, its field path)
    raw: Mapping[str, Any]


def instance_types_of(cr: Mapping[str, Any], path: str) -> list[tuple[str, str]]:
    if "InstanceType" in cr:
        return [(cr["InstanceType"], f"{path}.InstanceType")]
    return [(inst["InstanceType"], f"{path}.Instances[{k}].InstanceType")
            for k, inst in enumerate(cr.get("Instances", [])) if "InstanceType" in inst]


def efa_enabled(cr: Mapping[str, Any]) -> bool:
    return bool(cr.get("Efa", {}).get("Enabled", False))


def compute_resources(raw: Mapping[str, Any]) -> Iterator[ComputeResourceRef]:
    for i, q in enumerate(raw.get("Scheduling", {}).get("SlurmQueues", [])):
        for j, cr in enumerate(q.get("ComputeResources", [])):
            path = f"Scheduling.SlurmQueues[{i}].ComputeResources[{j}]"
            yield ComputeResourceRef(q.get("Name", ""), cr.get("Name", ""), path,
                                     tuple(instance_types_of(cr, path)), cr)


# ------------------------------------------------------------------ placement groups


def _pg(node: Mapping[str, Any]) -> Mapping[str, Any] | None:
    pg = (node.get("Networking") or {}).get("PlacementGroup")
    return pg if isinstance(pg, Mapping) else None


def _assignment(pg: Mapping[str, Any]) -> Any:
    """``PlacementGroup.assignment``: the Name, else the Id (``name or id``)."""
    return pg.get("Name") or pg.get("Id")


def chosen_placement_group(q: Mapping[str, Any], cr: Mapping[str, Any],
                           qpath: str, path: str) -> tuple[Mapping[str, Any], str]:
    """``SlurmQueue.get_chosen_placement_group_setting_for_compute_resource``: the compute
    resource's ``Networking.PlacementGroup`` whenever it is written at all (even ``{}``: only
    an absent one is "implied"), else the queue's (an absent one of those is ``{}`` too).
    Returns the setting and its field path."""
    own = _pg(cr)
    if own is not None:
        return own, f"{path}.Networking.PlacementGroup"
    return _pg(q) or {}, f"{qpath}.Networking.PlacementGroup"


def placement_group_key(q: Mapping[str, Any], cr: Mapping[str, Any], pg: Mapping[str, Any],
                        ) -> str | None:
    """``SlurmQueue.get_placement_group_settings_for_compute_resource()["key"]``: the Name or
    Id when given (whatever ``Enabled`` says), else ``<queue>-<compute resource>`` (a managed
    group) when ``Enabled`` is true, else None: no placement group."""
    if _assignment(pg):
        return str(_assignment(pg))
    if pg.get("Enabled"):
        return f"{q.get('Name')}-{cr.get('Name')}"
    return None


def enabled_or_assigned(pg: Mapping[str, Any]) -> bool:
    """``PlacementGroup.enabled_or_assigned``: ``enabled or assignment is not None``."""
    return bool(pg.get("Enabled")) or _assignment(pg) is not None


def queue_uses_placement_group(q: Mapping[str, Any]) -> bool:
    return any(placement_group_key(q, cr, chosen_placement_group(q, cr, "", "")[0]) is not None
               for cr in q.get("ComputeResources", []))


def _naming_issues(pg: Mapping[str, Any] | None, path: str) -> list[ConfigIssue]:
    """``ec2_validators.PlacementGroupNamingValidator``, on every PlacementGroup written (queue
    and compute resource level): Id with Name, and Name/Id with ``Enabled: false``, are ERRORs.
    (Its check that the named group exists needs AWS: ``--check-aws`` territory.)"""
    if pg is None:
        return []
    issues = []
    if pg.get("Id") and pg.get("Name"):
        issues.append(ConfigIssue(path, "PlacementGroup Id cannot be set when setting "
                                  "PlacementGroup Name: set either Id or Name, not both"))
    if (pg.get("Name") or pg.get("Id")) and pg.get("Enabled") is False:
        issues.append(ConfigIssue(f"{path}.Enabled", "a placement group Name or Id needs the "
                                  "placement group enabled: remove the Name/Id to run without "
                                  "one, or set Enabled: true (or remove Enabled, which implies "
                                  "it with a Name/Id)"))
    return issues


# ------------------------------------------------------------------ GPU health checks


def _gpu_check_setting(node: Mapping[str, Any]) -> bool | None:
    value = ((node.get("HealthChecks") or {}).get("Gpu") or {}).get("Enabled")
    return None if value is None else bool(value)


def gpu_health_check(q: Mapping[str, Any], cr: Mapping[str, Any]) -> bool | None:
    """The GPU health check a compute resource's nodes get: its own
    ``HealthChecks.Gpu.Enabled`` when set, else its queue's (``SlurmQueue.health_checks`` and
    ``SlurmComputeResource.health_checks`` are both loaded; the compute resource's overrides,
    as ParallelCluster's integration-test configs rely on: a queue with ``Enabled: true`` and a
    compute resource with ``Enabled: false``). None: neither says."""
    own = _gpu_check_setting(cr)
    return own if own is not None else _gpu_check_setting(q)


# ------------------------------------------------------------------ the checks


def clusterflow_checks(raw: Mapping[str, Any], subnet_azs: Mapping[str, str] | None = None,
                       ) -> list[ConfigIssue]:
    """Checks on a config that already passed the schema (so its shape is known); errors and
    warnings (``ConfigIssue.level``) in one list."""
    issues: list[ConfigIssue] = []
    head = raw.get("HeadNode", {}).get("InstanceType")
    if head:
        issues += type_issues(head, "HeadNode.InstanceType")

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


def type_issues(name: str, path: str) -> list[ConfigIssue]:
    """A type with facts: nothing. A real EC2 type the catalog has no facts for: a warning (its
    EFA/GPU/vCPU checks are skipped). A name in neither botocore's list nor moto's data: an
    error (ParallelCluster's ``InstanceTypeValidator`` refuses types EC2 does not offer; offline,
    botocore's list is the best knowledge), worded as unknown to this catalog."""
    if name in instance_types.catalog():
        return []
    try:
        instance_types.lookup(name)
    except instance_types.UnknownInstanceType as e:
        if e.known_name:
            return [warning(path, f"{e}: its EFA, GPU and vCPU checks are skipped")]
        return [ConfigIssue(path, f"{e} ({REGENERATE})")]
    raise AssertionError(name)


def _multi_az(q: Mapping[str, Any], subnet_azs: Mapping[str, str]) -> tuple[bool, str]:
    """``SlurmQueue.multi_az_enabled`` (``len(networking.az_list) > 1``) and how it is known.
    Offline without the subnet -> AZ map: ParallelCluster's ``QueueSubnetsValidator`` refuses
    two subnets of one queue in the same AZ, so n subnets mean n AZs."""
    subnets = list(dict.fromkeys(q.get("Networking", {}).get("SubnetIds", [])))
    if len(subnets) < 2:
        return False, ""
    azs = {s: subnet_azs[s] for s in subnets if s in subnet_azs}
    if len(azs) == len(subnets):
        where = ", ".join(f"{s} in {azs[s]}" for s in subnets)
        if len(set(azs.values())) > 1:
            return True, f"the subnets span {len(set(azs.values()))} Availability Zones ({where})"
        return True, (f"the subnets share one Availability Zone ({where}), which ParallelCluster "
                      "refuses for one queue")
    return True, ("ParallelCluster requires a queue's subnets to be in different Availability "
                  f"Zones, so {len(subnets)} subnets mean {len(subnets)} AZs")


def _queue_checks(q: Mapping[str, Any], qpath: str, subnet_azs: Mapping[str, str],
                  ) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    catalog = instance_types.catalog()
    capacity_block = q.get("CapacityType") == CAPACITY_BLOCK
    multi_az, az_detail = _multi_az(q, subnet_azs)
    issues += _naming_issues(_pg(q), f"{qpath}.Networking.PlacementGroup")
    multi_az_efa = multi_az_pg = False
    seen: dict[str, int] = {}
    for j, cr in enumerate(q.get("ComputeResources", [])):
        path = f"{qpath}.ComputeResources[{j}]"
        if cr["Name"] in seen:
            first = f"{qpath}.ComputeResources[{seen[cr['Name']]}]"
            issues.append(ConfigIssue(f"{path}.Name", f"compute resource name '{cr['Name']}' "
                                      f"is already used by {first}"))
        seen.setdefault(cr["Name"], j)
        types = instance_types_of(cr, path)
        known = [(t, p) for t, p in types if t in catalog]
        for t, p in types:
            issues += type_issues(t, p)
        issues += _naming_issues(_pg(cr), f"{path}.Networking.PlacementGroup")

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

        pg, pg_path = chosen_placement_group(q, cr, qpath, path)
        key = placement_group_key(q, cr, pg)
        efa = efa_enabled(cr)
        if efa:
            for t, p in known:  # EfaValidator
                if not catalog[t].efa:
                    issues.append(ConfigIssue(p, f"instance type '{t}' does not support EFA "
                                              f"({path}.Efa.Enabled is true): pick an EFA type "
                                              "(e.g. hpc7a.96xlarge, c6in.32xlarge, c5n.18xlarge, "
                                              "p5.48xlarge) or disable EFA"))
        issues += _efa_placement_group(q, pg, pg_path, key, efa, multi_az, capacity_block, path)
        if capacity_block and key is not None:  # PlacementGroupCapacityTypeValidator
            issues.append(warning(pg_path, "with a capacity block reservation a placement group "
                                  "can cause insufficient-capacity errors outside the "
                                  f"reservation: remove it for compute resource '{cr['Name']}'"))
        if key is not None:  # InstanceTypePlacementGroupValidator
            issues += [ConfigIssue(p, f"instance type '{t}' cannot be launched in a cluster "
                                   f"placement group ({pg_path} puts '{cr['Name']}' in one): "
                                   "disable the placement group or pick another type")
                       for t, p in known if not catalog[t].cluster_placement]
        multi_az_efa |= multi_az and efa  # EfaMultiAzValidator
        multi_az_pg |= multi_az and enabled_or_assigned(pg)  # MultiAzPlacementGroupValidator
        issues += _gpu_warnings(q, cr, path, known)

    if multi_az_efa or multi_az_pg:
        why = "EFA" if multi_az_efa else "a cluster placement group"
        issues.append(ConfigIssue(f"{qpath}.Networking.SubnetIds",
                                  f"queue '{q['Name']}' uses {why}, which does not cross "
                                  f"Availability Zones, but {az_detail}: list exactly one subnet"))
    return issues


def _efa_placement_group(q: Mapping[str, Any], pg: Mapping[str, Any], pg_path: str,
                         key: str | None, efa: bool, multi_az: bool, capacity_block: bool,
                         path: str) -> list[ConfigIssue]:
    """``cluster_validators.EfaPlacementGroupValidator``, exactly: nothing for a capacity
    block queue or a multi-AZ queue; with EFA, ``Enabled: false`` on the chosen setting is a
    WARNING (expected with a capacity reservation that has its own group), and no placement
    group at all (no Name/Id and not enabled: absent, ``{}``, or a compute resource's ``{}``
    overriding the queue's) is an ERROR."""
    if capacity_block or multi_az or not efa:
        return []
    if pg.get("Enabled") is False:
        return [warning(f"{pg_path}.Enabled", f"placement group is disabled for EFA compute "
                        f"resources of queue '{q['Name']}': expected with a capacity reservation "
                        "that has its own placement group; otherwise a placement group may "
                        "improve network performance")]
    if key is None:
        return [ConfigIssue(f"{path}.Efa.Enabled", "EFA needs an explicit placement group: set "
                            f"{pg_path}.Enabled: true (or Enabled: false to run EFA without "
                            "one, e.g. with a capacity reservation that has its own group)")]
    return []


def _gpu_warnings(q: Mapping[str, Any], cr: Mapping[str, Any], path: str,
                  known: list[tuple[str, str]]) -> list[ConfigIssue]:
    """ParallelCluster has no error for GPU health checks on a type without GPUs (its own
    test configs do it), so this is a warning at most, and none when the compute resource (or,
    without its own setting, the queue) says ``HealthChecks: Gpu: Enabled: false``. A queue or
    compute resource named like ``gpu`` without any setting gets the same hint."""
    setting = gpu_health_check(q, cr)
    if setting is False:
        return []
    if setting:
        why = "has GPU health checks enabled"
    elif _GPU_NAME.search(str(q.get("Name", ""))) or _GPU_NAME.search(str(cr.get("Name", ""))):
        why = "is named like a GPU queue"
    else:
        return []
    catalog = instance_types.catalog()
    return [warning(p, f"compute resource '{cr['Name']}' of queue '{q['Name']}' {why} but "
                    f"instance type '{t}' has no GPU: if GPUs were meant, use a GPU type (e.g. "
                    "p5.48xlarge, g6.12xlarge); otherwise set HealthChecks: Gpu: Enabled: false")
            for t, p in known if not catalog[t].gpus]
