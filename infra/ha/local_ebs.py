"""The EBS data plane the embedded endpoint lacks, on the local disk, for the HA drill.

moto keeps volumes and snapshots as records only: a snapshot holds no bytes, a volume made
from it is empty. The drill needs the bytes (Slurm's saved state must survive), so this module
gives every EBS record a body on disk, driven by the same API calls, at the moment AWS would act:

==========================  =================================================================
EBS (AWS)                   here
==========================  =================================================================
volume ``vol-x``            directory ``<root>/volumes/vol-x/``
CreateSnapshot of ``vol-x`` ``<root>/snapshots/snap-y.tar``: a tar of the volume, taken inside
                            the CreateSnapshot call (point in time, as EBS)
CreateVolume from snapshot  the archive extracted into ``volumes/vol-z/`` inside the call
CreateVolume, no snapshot   an empty directory
attach + mount at ``/m``    the volume directory is moved to ``/m`` (only if the API says the
                            volume is attached); unmount moves it back
instance dies               its mount disappears (``unmount``): writes after that are lost
==========================  =================================================================

The hooks are botocore ``after-call`` events on the one ec2 client every handler and boot step
uses, so handler code is unchanged: it calls EC2 and the bytes follow. AZs are not modelled
here; the code under test checks them against the API (EBS never attaches across AZs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class LocalEbsError(RuntimeError):
    """A data-plane step has no body to act on; the message names the EBS id."""


class LocalEbs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.volumes = root / "volumes"
        self.snapshots = root / "snapshots"
        for d in (self.volumes, self.snapshots):
            d.mkdir(parents=True, exist_ok=True)
        self._mounts: dict[Path, str] = {}  # mount point -> volume id
        self._ec2: Any = None
        self.log: list[str] = []

    # ---- where bytes are

    def volume_path(self, volume_id: str) -> Path:
        for mount_point, vol in self._mounts.items():
            if vol == volume_id:
                return mount_point
        path = self.volumes / volume_id
        if not path.is_dir():
            raise LocalEbsError(f"volume {volume_id} has no data here (created outside the drill?)")
        return path

    def snapshot_path(self, snapshot_id: str) -> Path:
        return self.snapshots / f"{snapshot_id}.tar"

    # ---- data-plane effects of API calls

    def create_volume(self, volume_id: str, snapshot_id: str | None) -> None:
        target = self.volumes / volume_id
        if snapshot_id is None:
            target.mkdir()
            self.log.append(f"CreateVolume {volume_id}: blank")
            return
        archive = self.snapshot_path(snapshot_id)
        if not archive.exists():
            raise LocalEbsError(f"snapshot {snapshot_id} has no data here")
        tmp = self.volumes / f".{volume_id}.{uuid.uuid4().hex}"
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="tar")
        tmp.rename(target)
        self.log.append(f"CreateVolume {volume_id}: from {snapshot_id}")

    def create_snapshot(self, snapshot_id: str, volume_id: str) -> None:
        source = self.volume_path(volume_id)
        tmp = self.snapshots / f".{snapshot_id}.{uuid.uuid4().hex}"
        with tarfile.open(tmp, "w") as tar:
            tar.add(source, arcname=".")
        tmp.rename(self.snapshot_path(snapshot_id))
        self.log.append(f"CreateSnapshot {snapshot_id}: of {volume_id}")

    # ---- the instance side

    def mount(self, volume_id: str, device: str, mount_point: str) -> None:
        """The ``Mounter`` that ``head_boot.boot`` calls: only an attached volume mounts."""
        if self._ec2 is not None:
            vol = self._ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
            if vol["State"] != "in-use" or not vol.get("Attachments"):
                raise LocalEbsError(f"volume {volume_id} is not attached; cannot mount it")
        mp = Path(mount_point)
        if mp in self._mounts:
            if self._mounts[mp] == volume_id:
                return
            raise LocalEbsError(f"{mp} already has {self._mounts[mp]} mounted")
        if mp.exists():
            if any(mp.iterdir()):
                raise LocalEbsError(f"mount point {mp} is not empty")
            mp.rmdir()
        mp.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.volumes / volume_id, mp)
        self._mounts[mp] = volume_id
        self.log.append(f"mount {volume_id} ({device}) at {mp}")

    def unmount(self, mount_point: str | Path) -> str:
        mp = Path(mount_point)
        volume_id = self._mounts.pop(mp)
        os.rename(mp, self.volumes / volume_id)
        mp.mkdir()  # an empty mount point stays behind, as on a real host
        self.log.append(f"unmount {volume_id} from {mp}")
        return volume_id

    def unmount_all(self) -> None:
        for mp in list(self._mounts):
            self.unmount(mp)

    def remove(self) -> None:
        self.unmount_all()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- wiring to the API

    def _after_create_volume(self, parsed: dict[str, Any], **_: Any) -> None:
        if "VolumeId" in parsed:
            self.create_volume(parsed["VolumeId"], parsed.get("SnapshotId") or None)

    def _after_create_snapshot(self, parsed: dict[str, Any], **_: Any) -> None:
        if "SnapshotId" in parsed:
            self.create_snapshot(parsed["SnapshotId"], parsed["VolumeId"])

    @contextlib.contextmanager
    def attached_to(self, ec2: Any) -> Iterator[LocalEbs]:
        """Give ``ec2``'s volume and snapshot calls their data-plane effects while inside."""
        events = ec2.meta.events
        hooks = [("after-call.ec2.CreateVolume", self._after_create_volume),
                 ("after-call.ec2.CreateSnapshot", self._after_create_snapshot)]
        ids = [f"clusterflow-local-ebs-{id(self)}-{name}" for name, _ in hooks]
        for (name, fn), uid in zip(hooks, ids, strict=True):
            events.register(name, fn, unique_id=uid)
        self._ec2 = ec2
        try:
            yield self
        finally:
            for (name, _), uid in zip(hooks, ids, strict=True):
                events.unregister(name, unique_id=uid)
            self._ec2 = None
