#!/usr/bin/env python3
"""Head-node boot for both HA designs: claim the Elastic IP, restore and mount the shared volume.

Runs on the head instance itself (user data installs it as a cloud-init per-boot script) and
is imported by the Lambda handlers, which share its restore logic. It must therefore depend
on nothing but the standard library and boto3: it is copied verbatim into the user data.

The shared volume holds the Slurm controller's StateSaveLocation and the job scripts. A
replacement head may come up in another AZ than the volume it replaces, and an EBS volume
never crosses an AZ, so the state travels as a snapshot: the newest completed snapshot tagged
for the cluster becomes a new volume in the instance's own AZ.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

TAG_CLUSTER = "clusterflow:cluster"
TAG_ROLE = "clusterflow:role"
TAG_RESTORED_FOR = "clusterflow:restored-for"
TAG_SOURCE_SNAPSHOT = "clusterflow:source-snapshot"
TAG_TAKEN_AT = "clusterflow:taken-at"
TAG_REASON = "clusterflow:reason"
ROLE_EIP = "head-eip"
ROLE_VOLUME = "shared-volume"
ROLE_SNAPSHOT = "shared-snapshot"
ROLE_HEAD = "head"  # the ASG design's one head
ROLE_PRIMARY = "head-primary"
ROLE_STANDBY = "head-standby"
EXIT_STANDBY = 3  # booted as the stopped standby's first boot: nothing to claim yet

IMDS_URL = os.environ.get("CLUSTERFLOW_IMDS_URL", "http://169.254.169.254")


class HeadBootError(RuntimeError):
    """The head cannot claim its address or its state; the message names the resource."""


@dataclass(frozen=True)
class Identity:
    instance_id: str
    availability_zone: str
    region: str


@dataclass(frozen=True)
class VolumeSpec:
    device: str = "/dev/sdf"
    size_gib: int = 16
    volume_type: str = "gp3"


class Mounter(Protocol):
    def mount(self, volume_id: str, device: str, mount_point: str) -> None: ...


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def tag_spec(resource_type: str, tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"ResourceType": resource_type,
             "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


def cluster_filters(cluster: str, role: str) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]},
            {"Name": f"tag:{TAG_ROLE}", "Values": [role]}]


# --------------------------------------------------------------------------- discovery


def instance(ec2: Any, instance_id: str) -> dict[str, Any]:
    res = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    if not res or not res[0]["Instances"]:
        raise HeadBootError(f"instance {instance_id} not found")
    return res[0]["Instances"][0]


def eip(ec2: Any, cluster: str) -> dict[str, Any]:
    found = ec2.describe_addresses(Filters=cluster_filters(cluster, ROLE_EIP))["Addresses"]
    if len(found) != 1:
        raise HeadBootError(
            f"expected exactly one Elastic IP tagged {TAG_CLUSTER}={cluster}, "
            f"{TAG_ROLE}={ROLE_EIP}; found {len(found)}")
    return found[0]


def attached_shared_volume(ec2: Any, cluster: str, instance_id: str) -> dict[str, Any] | None:
    vols = ec2.describe_volumes(Filters=[
        *cluster_filters(cluster, ROLE_VOLUME),
        {"Name": "attachment.instance-id", "Values": [instance_id]}])["Volumes"]
    return max(vols, key=lambda v: v["CreateTime"]) if vols else None


def newest_snapshot(ec2: Any, cluster: str) -> dict[str, Any] | None:
    """The cluster's newest usable snapshot (pending ones count: they complete on their own)."""
    snaps = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        *cluster_filters(cluster, ROLE_SNAPSHOT),
        {"Name": "status", "Values": ["pending", "completed"]}])["Snapshots"]
    # StartTime has one-second resolution; the taken-at tag (ns) orders snapshots within it.
    return max(snaps, key=lambda s: (s["StartTime"], int(tags_of(s).get(TAG_TAKEN_AT, "0"))),
               default=None)


# --------------------------------------------------------------------------- actions


def associate_eip(ec2: Any, cluster: str, instance_id: str) -> dict[str, str]:
    """Move the cluster's EIP here; AllowReassociation takes it off a dead or old head."""
    address = eip(ec2, cluster)
    if address.get("InstanceId") != instance_id:
        ec2.associate_address(AllocationId=address["AllocationId"], InstanceId=instance_id,
                              AllowReassociation=True)
    return {"allocation_id": address["AllocationId"], "public_ip": address["PublicIp"]}


def snapshot_volume(ec2: Any, cluster: str, volume_id: str, *, reason: str,
                    instance_id: str = "") -> str:
    """Start a point-in-time snapshot; EBS finishes it even if the volume goes away."""
    tags = {TAG_CLUSTER: cluster, TAG_ROLE: ROLE_SNAPSHOT, TAG_REASON: reason,
            TAG_TAKEN_AT: str(time.time_ns())}
    if instance_id:
        tags["clusterflow:source-instance"] = instance_id
    snap = ec2.create_snapshot(
        VolumeId=volume_id, Description=f"clusterflow {cluster} shared volume ({reason})",
        TagSpecifications=tag_spec("snapshot", tags))
    return snap["SnapshotId"]


def prune_snapshots(ec2: Any, cluster: str, keep: int, role: str = ROLE_SNAPSHOT) -> list[str]:
    snaps = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        *cluster_filters(cluster, role),
        {"Name": "status", "Values": ["completed"]}])["Snapshots"]
    snaps.sort(key=lambda s: (s["StartTime"], int(tags_of(s).get(TAG_TAKEN_AT, "0"))))
    doomed = [s["SnapshotId"] for s in snaps[:-keep]] if keep > 0 else []
    for snap_id in doomed:
        ec2.delete_snapshot(SnapshotId=snap_id)
    return doomed


def restore_shared_volume(ec2: Any, cluster: str, ident: Identity, spec: VolumeSpec, *,
                          snapshot_id: str | None = None, wait_delay: int = 5,
                          ) -> dict[str, Any]:
    """Give ``ident`` the cluster's shared volume, idempotently.

    Already attached: nothing to do. Otherwise a volume is created in the instance's AZ from
    ``snapshot_id`` or the newest tagged snapshot (blank on the very first boot) and attached.
    It is tagged with the instance and the snapshot it holds, so a second caller (the launch
    hook and the boot script both restore) attaches that volume instead of making another,
    while a stale volume restored for the same instance from an older snapshot is never reused.
    """
    current = attached_shared_volume(ec2, cluster, ident.instance_id)
    if current is not None:
        return {"volume_id": current["VolumeId"], "created": False,
                "snapshot_id": current.get("SnapshotId") or None,
                "availability_zone": current["AvailabilityZone"]}
    if snapshot_id is None:
        snap = newest_snapshot(ec2, cluster)
        snapshot_id = snap["SnapshotId"] if snap else None
    source = snapshot_id or "none"
    pending = ec2.describe_volumes(Filters=[
        *cluster_filters(cluster, ROLE_VOLUME),
        {"Name": f"tag:{TAG_RESTORED_FOR}", "Values": [ident.instance_id]},
        {"Name": f"tag:{TAG_SOURCE_SNAPSHOT}", "Values": [source]},
        {"Name": "status", "Values": ["creating", "available"]}])["Volumes"]
    created = not pending
    if pending:
        volume = pending[0]
    else:
        kwargs: dict[str, Any] = {"AvailabilityZone": ident.availability_zone,
                                  "VolumeType": spec.volume_type}
        if snapshot_id:
            ec2.get_waiter("snapshot_completed").wait(
                SnapshotIds=[snapshot_id], WaiterConfig={"Delay": wait_delay, "MaxAttempts": 120})
            kwargs["SnapshotId"] = snapshot_id
        else:
            kwargs["Size"] = spec.size_gib
        tags = {TAG_CLUSTER: cluster, TAG_ROLE: ROLE_VOLUME, TAG_RESTORED_FOR: ident.instance_id,
                TAG_SOURCE_SNAPSHOT: source}
        volume = ec2.create_volume(**kwargs, TagSpecifications=tag_spec("volume", tags))
    # An EBS volume attaches only inside its own AZ (an emulator may not check: we do).
    if volume["AvailabilityZone"] != ident.availability_zone:
        raise HeadBootError(
            f"volume {volume['VolumeId']} is in {volume['AvailabilityZone']} but instance "
            f"{ident.instance_id} is in {ident.availability_zone}; restore from a snapshot")
    ec2.get_waiter("volume_available").wait(
        VolumeIds=[volume["VolumeId"]], WaiterConfig={"Delay": wait_delay, "MaxAttempts": 60})
    ec2.attach_volume(VolumeId=volume["VolumeId"], InstanceId=ident.instance_id,
                      Device=spec.device)
    ec2.get_waiter("volume_in_use").wait(
        VolumeIds=[volume["VolumeId"]], WaiterConfig={"Delay": wait_delay, "MaxAttempts": 60})
    return {"volume_id": volume["VolumeId"], "created": created, "snapshot_id": snapshot_id,
            "availability_zone": volume["AvailabilityZone"]}


# --------------------------------------------------------------------------- the instance


def imds_identity(base_url: str = IMDS_URL, timeout: float = 2.0) -> Identity:
    """Instance id, AZ and region from IMDSv2 (token first, as launch templates require)."""
    req = urllib.request.Request(f"{base_url}/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        token = r.read().decode()

    def get(path: str) -> str:
        req = urllib.request.Request(f"{base_url}/latest/meta-data/{path}",
                                     headers={"X-aws-ec2-metadata-token": token})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode().strip()

    return Identity(get("instance-id"), get("placement/availability-zone"),
                    get("placement/region"))


class BlockDeviceMounter:
    """Mounts an attached EBS volume: Nitro names it by volume id, Xen by the device name."""

    def __init__(self, timeout: float = 300) -> None:
        self.timeout = timeout

    def _device_path(self, volume_id: str, device: str) -> str:
        serial = volume_id.replace("-", "")
        nvme = Path("/dev/disk/by-id") / f"nvme-Amazon_Elastic_Block_Store_{serial}"
        candidates = [nvme, Path(device.replace("/dev/sd", "/dev/xvd")), Path(device)]
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for path in candidates:
                if path.exists():
                    return str(path.resolve())
            time.sleep(1)
        raise HeadBootError(f"volume {volume_id} did not appear as a block device "
                            f"({', '.join(map(str, candidates))}) within {self.timeout:.0f} s")

    def mount(self, volume_id: str, device: str, mount_point: str) -> None:
        dev = self._device_path(volume_id, device)
        if subprocess.run(["findmnt", "-rn", mount_point], capture_output=True).returncode == 0:
            return
        # blkid exits 2 when it finds no filesystem: only a blank (never-used) volume.
        if subprocess.run(["blkid", dev], capture_output=True).returncode == 2:
            subprocess.run(["mkfs.xfs", "-q", dev], check=True)
        Path(mount_point).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", dev, mount_point], check=True)


def boot(ec2: Any, ident: Identity, *, cluster: str, mount_point: str, spec: VolumeSpec,
         mounter: Mounter | None, wait_delay: int = 5) -> dict[str, Any]:
    """Everything a head does when it comes up; returns what it did (JSON-able)."""
    me = instance(ec2, ident.instance_id)
    role = tags_of(me).get(TAG_ROLE, "")
    if tags_of(me).get(TAG_CLUSTER) != cluster:
        raise HeadBootError(f"instance {ident.instance_id} is not tagged {TAG_CLUSTER}={cluster}")
    if role == ROLE_STANDBY:  # the standby's first boot before it is stopped: claim nothing
        return {"instance_id": ident.instance_id, "role": role, "active": False}
    address = associate_eip(ec2, cluster, ident.instance_id)
    volume = restore_shared_volume(ec2, cluster, ident, spec, wait_delay=wait_delay)
    if mounter is not None:
        mounter.mount(volume["volume_id"], spec.device, mount_point)
    return {"instance_id": ident.instance_id, "role": role, "active": True,
            "availability_zone": ident.availability_zone, "eip": address, "volume": volume,
            "mount_point": mount_point, "mounted": mounter is not None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", required=True, help="JSON file written by the user data")
    p.add_argument("--no-mount", action="store_true",
                   help="claim the EIP and attach the volume, but do not mount it")
    args = p.parse_args(argv)
    s = json.loads(Path(args.settings).read_text())
    ident = imds_identity()
    import boto3  # only here: importing this module (Lambda, tests) must not need a region

    ec2 = boto3.client("ec2", region_name=ident.region)
    spec = VolumeSpec(s["device"], int(s["size_gib"]), s["volume_type"])
    try:
        result = boot(ec2, ident, cluster=s["cluster"], mount_point=s["mount_point"], spec=spec,
                      mounter=None if args.no_mount else BlockDeviceMounter())
    except HeadBootError as e:
        print(f"clusterflow head boot: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, default=str))
    return 0 if result["active"] else EXIT_STANDBY


if __name__ == "__main__":
    sys.exit(main())
