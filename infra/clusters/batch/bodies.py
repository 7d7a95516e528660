"""The AWS Batch and EC2 request bodies for an MNP environment, built from the config alone (pure:
no AWS call), and Batch's documented MNP limits checked on them before anything is sent."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import Any

from infra.backends.providers.spot import batch_retry_strategy
from infra.backends.shell_safety import safe_arg
from infra.clusters.batch.common import BatchLimitError, _tags
from infra.clusters.batch_config import MAX_NODE_GROUPS, MAX_NODES, BatchMnpConfig, Volume


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
        # Retry only when the instance went away, at most interruptions_allowed times.
        "retryStrategy": batch_retry_strategy(cfg.interruptions_allowed),
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
