"""The HA handlers and deploy against the session's moto server (real HTTP, real boto3)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from infra.aws.clients import AwsTarget
from infra.ha import head_boot as hb
from infra.ha.config import HaConfig
from infra.ha.deploy import Deployment, deploy, lambda_zip
from infra.ha.drill import LocalLambda, alarm_event, lifecycle_event
from infra.ha.handlers import (
    ROLE_RETIRED,
    TAG_KEEP,
    RecoveryError,
    complete_lifecycle_action,
    retire_detached_volumes,
)

REGION = "us-east-1"


def _cfg(design: str) -> HaConfig:
    return HaConfig(cluster=f"t-{uuid.uuid4().hex[:8]}", design=design)  # type: ignore[arg-type]


def _az(aws: AwsTarget, instance_id: str) -> str:
    return hb.instance(aws.client("ec2"), instance_id)["Placement"]["AvailabilityZone"]


def _boot(aws: AwsTarget, cfg: HaConfig, instance_id: str) -> dict[str, Any]:
    """The head's boot script, minus the kernel mount (there is no block device here)."""
    v = cfg.shared_volume
    ident = hb.Identity(instance_id, _az(aws, instance_id), REGION)
    return hb.boot(aws.client("ec2"), ident, cluster=cfg.cluster, mount_point=v.mount_point,
                   spec=hb.VolumeSpec(v.device, v.size_gib, v.volume_type), mounter=None,
                   wait_delay=1)


def _eip_instance(aws: AwsTarget, dep: Deployment) -> str | None:
    return aws.client("ec2").describe_addresses(
        AllocationIds=[dep.eip_allocation_id])["Addresses"][0].get("InstanceId")


def _alarm(aws: AwsTarget, dep: Deployment) -> dict[str, Any]:
    cw = aws.client("cloudwatch")
    cw.set_alarm_state(AlarmName=dep.alarm_name, StateValue="ALARM", StateReason="test")
    alarm = cw.describe_alarms(AlarmNames=[dep.alarm_name])["MetricAlarms"][0]
    return alarm_event(alarm, dep.account, REGION)


def _watched(aws: AwsTarget, dep: Deployment) -> str:
    alarm = aws.client("cloudwatch").describe_alarms(AlarmNames=[dep.alarm_name])
    return alarm["MetricAlarms"][0]["Dimensions"][0]["Value"]


# --------------------------------------------------------------------------- lifecycle gap


@dataclass(frozen=True)
class StubbedTarget:
    """An AwsTarget stand-in whose autoscaling client answers what the test stubs."""

    embedded: bool
    client_: Any

    def client(self, service: str) -> Any:
        assert service == "autoscaling"
        return self.client_


DETAIL = {"AutoScalingGroupName": "g", "LifecycleHookName": "h", "EC2InstanceId": "i-1",
          "LifecycleActionToken": str(uuid.uuid4())}


def _stubbed(embedded: bool, status: int, code: str) -> tuple[StubbedTarget, Stubber]:
    client = boto3.session.Session().client(
        "autoscaling", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    stub = Stubber(client)
    stub.add_client_error("complete_lifecycle_action", service_error_code=code,
                          http_status_code=status)
    stub.activate()
    return StubbedTarget(embedded, client), stub


def test_lifecycle_completion_tolerates_only_the_emulators_500(aws: AwsTarget) -> None:
    # The real gap: moto 5.2.5 answers 500 for this call; tolerated on the embedded endpoint.
    assert complete_lifecycle_action(aws, DETAIL) == "not-implemented-by-emulator"
    # The same 500 from AWS is a failure: it must raise, never read as completed.
    target, _ = _stubbed(embedded=False, status=500, code="InternalFailure")
    with pytest.raises(Exception, match="InternalFailure"):
        complete_lifecycle_action(target, DETAIL)
    # A real error from the emulator (not the missing call) raises as well.
    target, _ = _stubbed(embedded=True, status=400, code="ValidationError")
    with pytest.raises(Exception, match="ValidationError"):
        complete_lifecycle_action(target, DETAIL)
    # And success is success.
    client = boto3.session.Session().client(
        "autoscaling", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        stub.add_response("complete_lifecycle_action", {})
        assert complete_lifecycle_action(StubbedTarget(False, client), DETAIL) == "completed"


# --------------------------------------------------------------------------- standby


def test_standby_fails_over_across_azs_and_back(aws: AwsTarget) -> None:
    cfg = _cfg("standby")
    dep = deploy(aws, cfg, wait_delay=1)
    assert dep.primary_id and dep.standby_id
    ec2, lam = aws.client("ec2"), LocalLambda(aws)
    assert not _boot(aws, cfg, dep.standby_id)["active"]  # the standby claims nothing
    first = _boot(aws, cfg, dep.primary_id)
    assert first["volume"]["created"] and first["volume"]["snapshot_id"] is None  # blank
    assert _eip_instance(aws, dep) == dep.primary_id
    assert hb.instance(ec2, dep.standby_id)["State"]["Name"] == "stopped"

    # The primary is impaired but running: it must be fenced (stopped), not just abandoned.
    event = _alarm(aws, dep)
    r = lam.invoke(dep.functions["recovery"], event)
    assert r["action"] == "failed-over" and r["new_instance"] == dep.standby_id
    assert [r["old_az"], r["new_az"]] == cfg.availability_zones[:2]
    assert hb.instance(ec2, dep.primary_id)["State"]["Name"] == "stopped"
    assert hb.instance(ec2, dep.standby_id)["State"]["Name"] == "running"
    assert _eip_instance(aws, dep) == dep.standby_id
    vol = hb.attached_shared_volume(ec2, cfg.cluster, dep.standby_id)
    assert vol is not None and vol["AvailabilityZone"] == r["new_az"]
    assert vol["SnapshotId"] == r["snapshot_id"]
    snap = ec2.describe_snapshots(SnapshotIds=[r["snapshot_id"]])["Snapshots"][0]
    assert snap["VolumeId"] == first["volume"]["volume_id"]
    assert hb.tags_of(snap)[hb.TAG_CLUSTER] == cfg.cluster
    assert _watched(aws, dep) == dep.standby_id  # the alarm now watches the new primary
    roles = {i: hb.tags_of(hb.instance(ec2, i))[hb.TAG_ROLE]
             for i in (dep.primary_id, dep.standby_id)}
    assert roles == {dep.primary_id: hb.ROLE_STANDBY, dep.standby_id: hb.ROLE_PRIMARY}

    # The same alarm delivered again (Lambda retries) must not fail back.
    again = lam.invoke(dep.functions["recovery"], event)
    assert again["action"] == "ignored" and _eip_instance(aws, dep) == dep.standby_id

    # Second failure, back to the first instance: its stale volume (older state) is replaced
    # by one restored from the new snapshot, never reused.
    _boot(aws, cfg, dep.standby_id)
    back = lam.invoke(dep.functions["recovery"], _alarm(aws, dep))
    assert back["new_instance"] == dep.primary_id and back["new_az"] == r["old_az"]
    restored = hb.attached_shared_volume(ec2, cfg.cluster, dep.primary_id)
    assert restored is not None and restored["SnapshotId"] == back["snapshot_id"]
    gone = ec2.describe_volumes(Filters=[{"Name": "volume-id",
                                          "Values": [first["volume"]["volume_id"]]}])
    assert gone["Volumes"] == []  # the stale one was deleted
    assert _eip_instance(aws, dep) == dep.primary_id


def test_standby_recovers_a_terminated_primary_then_needs_a_redeploy(aws: AwsTarget) -> None:
    cfg = _cfg("standby")
    dep = deploy(aws, cfg, wait_delay=1)
    assert dep.primary_id and dep.standby_id
    _boot(aws, cfg, dep.primary_id)
    ec2, lam = aws.client("ec2"), LocalLambda(aws)
    ec2.terminate_instances(InstanceIds=[dep.primary_id])
    r = lam.invoke(dep.functions["recovery"], _alarm(aws, dep))
    assert r["action"] == "failed-over" and r["standby_left"] is False
    assert _eip_instance(aws, dep) == dep.standby_id
    # The new primary fails too, and nothing stands by: say so instead of half-recovering.
    with pytest.raises(RecoveryError, match="no stopped standby"):
        lam.invoke(dep.functions["recovery"], _alarm(aws, dep))
    assert _eip_instance(aws, dep) == dep.standby_id  # nothing was touched
    # Deploying again keeps the running primary and adds a standby in the other AZ.
    again = deploy(aws, cfg, wait_delay=1)
    assert again.primary_id == dep.standby_id and again.standby_id not in (
        dep.primary_id, dep.standby_id)
    assert _az(aws, again.standby_id) == cfg.availability_zones[0]
    assert _watched(aws, again) == dep.standby_id
    assert lam.invoke(again.functions["recovery"], _alarm(aws, again))["new_instance"] == \
        again.standby_id


# --------------------------------------------------------------------------- asg


def test_asg_hooks_snapshot_then_restore_in_the_other_az(aws: AwsTarget) -> None:
    cfg = _cfg("asg")
    dep = deploy(aws, cfg, wait_delay=1)
    asg, ec2, lam = aws.client("autoscaling"), aws.client("ec2"), LocalLambda(aws)
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[dep.asg_name])
    group = group["AutoScalingGroups"][0]
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (1, 1, 1)
    assert len(group["VPCZoneIdentifier"].split(",")) == 2
    hooks = {h["LifecycleTransition"]: h for h in asg.describe_lifecycle_hooks(
        AutoScalingGroupName=dep.asg_name)["LifecycleHooks"]}
    assert set(hooks) == {"autoscaling:EC2_INSTANCE_LAUNCHING",
                          "autoscaling:EC2_INSTANCE_TERMINATING"}
    old = group["Instances"][0]["InstanceId"]

    def deliver(kind: str, transition: str, iid: str) -> dict[str, Any]:
        event = lifecycle_event(hooks[transition], iid, dep.account, REGION)
        return lam.invoke(dep.functions[kind], event)

    first = deliver("launch", "autoscaling:EC2_INSTANCE_LAUNCHING", old)
    assert first["volume"]["created"] and first["volume"]["snapshot_id"] is None
    assert first["lifecycle"] == "not-implemented-by-emulator"
    booted = _boot(aws, cfg, old)  # the boot script finds the hook's volume: no second one
    assert booted["volume"] == {**first["volume"], "created": False}
    assert _eip_instance(aws, dep) == old

    term = deliver("terminate", "autoscaling:EC2_INSTANCE_TERMINATING", old)
    assert term["action"] == "snapshotted" and term["volume_id"] == first["volume"]["volume_id"]
    old_az = _az(aws, old)
    subnets = dict(dep.subnets)
    other = next(az for az in subnets if az != old_az)
    asg.update_auto_scaling_group(AutoScalingGroupName=dep.asg_name,
                                  VPCZoneIdentifier=f"{subnets[other]},{subnets[old_az]}")
    ec2.terminate_instances(InstanceIds=[old])
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[dep.asg_name])
    new = group["AutoScalingGroups"][0]["Instances"][0]["InstanceId"]
    assert new != old and _az(aws, new) == other

    # A detached cluster volume an operator tagged to keep: the hook must leave it alone.
    pinned = ec2.create_volume(AvailabilityZone=old_az, Size=1, TagSpecifications=hb.tag_spec(
        "volume", {hb.TAG_CLUSTER: cfg.cluster, hb.TAG_ROLE: hb.ROLE_VOLUME,
                   TAG_KEEP: "debugging"}))["VolumeId"]
    old_volume = first["volume"]["volume_id"]
    assert ec2.describe_volumes(VolumeIds=[old_volume])["Volumes"][0]["State"] == "available"

    launch = deliver("launch", "autoscaling:EC2_INSTANCE_LAUNCHING", new)
    assert launch["volume"]["snapshot_id"] == term["snapshot_id"]
    assert launch["volume"]["availability_zone"] == other
    # The old head's volume: snapshotted after its detach (its final state; the terminate
    # snapshot was taken while the head still ran), then deleted instead of left billing.
    assert launch["retired_volumes"] == {"deleted": [old_volume], "snapshotting": [],
                                         "kept": [pinned], "failed": []}
    [retired] = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": f"tag:{hb.TAG_CLUSTER}", "Values": [cfg.cluster]},
        {"Name": f"tag:{hb.TAG_ROLE}", "Values": [ROLE_RETIRED]}])["Snapshots"]
    assert retired["VolumeId"] == old_volume and retired["State"] == "completed"
    # ...and it never becomes the state a later head restores.
    assert hb.newest_snapshot(ec2, cfg.cluster)["SnapshotId"] == term["snapshot_id"]
    left = {v["VolumeId"] for v in ec2.describe_volumes(Filters=[
        {"Name": f"tag:{hb.TAG_CLUSTER}", "Values": [cfg.cluster]}])["Volumes"]}
    assert left == {launch["volume"]["volume_id"], pinned}
    # Delivered twice (EventBridge is at-least-once): the same volume, not a second one.
    again_launch = deliver("launch", "autoscaling:EC2_INSTANCE_LAUNCHING", new)
    assert again_launch["volume"]["volume_id"] == launch["volume"]["volume_id"]
    assert again_launch["retired_volumes"] == {"deleted": [], "snapshotting": [],
                                               "kept": [pinned], "failed": []}
    _boot(aws, cfg, new)
    assert _eip_instance(aws, dep) == new  # moved off the terminated head

    # Deploying again changes nothing: same group, template, EIP; still one instance.
    again = deploy(aws, cfg, wait_delay=1)
    assert again.model_dump(exclude={"launch_template_id"}) == dep.model_dump(
        exclude={"launch_template_id"})
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[dep.asg_name])
    assert [i["InstanceId"] for i in group["AutoScalingGroups"][0]["Instances"]] == [new]


def test_restore_refuses_a_volume_from_another_az(aws: AwsTarget) -> None:
    cfg = _cfg("asg")
    dep = deploy(aws, cfg, wait_delay=1)
    ec2 = aws.client("ec2")
    group = aws.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[dep.asg_name])["AutoScalingGroups"][0]
    iid = group["Instances"][0]["InstanceId"]
    az = _az(aws, iid)
    wrong = next(a for a in cfg.availability_zones if a != az)
    # A restore left half-done in the wrong AZ (moto would even attach it): refused.
    ec2.create_volume(AvailabilityZone=wrong, Size=1, TagSpecifications=hb.tag_spec("volume", {
        hb.TAG_CLUSTER: cfg.cluster, hb.TAG_ROLE: hb.ROLE_VOLUME,
        hb.TAG_RESTORED_FOR: iid, hb.TAG_SOURCE_SNAPSHOT: "none"}))
    with pytest.raises(hb.HeadBootError, match=f"is in {wrong}"):
        _boot(aws, cfg, iid)
    assert hb.attached_shared_volume(ec2, cfg.cluster, iid) is None


# --------------------------------------------------------------------------- packaging


def test_lambda_package_needs_only_boto3(tmp_path: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(lambda_zip())) as z:
        z.extractall(tmp_path)
        names = sorted(z.namelist())
    assert "infra/ha/handlers.py" in names and "infra/ha/head_boot.py" in names
    assert lambda_zip() == lambda_zip()  # reproducible: redeploys do not churn the code
    # Import the handlers from the package alone, as the Lambda runtime would (boto3 is in
    # the runtime): nothing else of clusterflow's dependencies may be pulled in.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import infra.ha.handlers as h; import json;"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'pydantic', 'typer', 'rich', 'prefect', 'yaml', 'moto'});"
        "print(json.dumps({'file': h.__file__, 'bad': bad}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True, cwd=tmp_path, env=env)
    got = json.loads(out.stdout)
    assert got["file"].startswith(str(tmp_path)) and got["bad"] == []


def test_a_volume_is_deleted_only_after_its_own_snapshot_completed(aws: AwsTarget) -> None:
    """Until its retire snapshot has completed, a detached volume is the only copy of its
    last writes: it stays (reported as snapshotting) and a later call deletes it."""
    ec2, cluster = aws.client("ec2"), f"retire-{uuid.uuid4().hex[:8]}"
    vid = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=1, TagSpecifications=hb.tag_spec(
        "volume", {hb.TAG_CLUSTER: cluster, hb.TAG_ROLE: hb.ROLE_VOLUME}))["VolumeId"]
    stubbed = Stubber(ec2)  # moto completes snapshots at once; EBS takes minutes
    stubbed.add_response("describe_volumes", {"Volumes": [
        {"VolumeId": vid, "State": "available", "Tags": []}]})
    stubbed.add_response("describe_snapshots", {"Snapshots": []})
    stubbed.add_response("create_snapshot", {"SnapshotId": "snap-0123456789abcdef0",
                                             "VolumeId": vid, "State": "pending"})
    stubbed.add_response("describe_snapshots", {"Snapshots": []})  # the prune
    with stubbed:
        assert retire_detached_volumes(ec2, cluster) == {
            "deleted": [], "snapshotting": [vid], "kept": [], "failed": []}
    assert ec2.describe_volumes(VolumeIds=[vid])["Volumes"]  # still there
    # Later (for real now): the same call snapshots and, the snapshot complete, deletes.
    assert retire_detached_volumes(ec2, cluster, wait_delay=1, wait_attempts=5)["deleted"] == [vid]
    assert ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [vid]}])["Volumes"] == []
