"""Lambda-shaped head-node recovery handlers: ``handler(event, context) -> dict``.

Deployed as Lambda functions (``infra.ha.deploy`` zips this module with ``head_boot``), so they
import nothing beyond boto3 and the stdlib at module level. Their settings come from the
function's environment (``CLUSTERFLOW_HA_SETTINGS``, JSON); a local invoker (the drill) may pass
``context.environment`` and ``context.aws_target`` instead, which is how the same code runs
against the embedded endpoint, where Lambda itself cannot run (it needs Docker).

- ``recovery_handler``: standby design, invoked by the CloudWatch alarm on the primary's
  ``StatusCheckFailed``.
- ``terminate_hook_handler`` / ``launch_hook_handler``: ASG design, invoked by EventBridge for
  the group's lifecycle hooks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from botocore.exceptions import ClientError, WaiterError
from botocore.parsers import ResponseParserError

from infra.ha import head_boot as hb

SETTINGS_ENV = "CLUSTERFLOW_HA_SETTINGS"
log = logging.getLogger("clusterflow.ha")


class RecoveryError(RuntimeError):
    """Recovery cannot proceed; the message says which resource is missing or wrong."""


def _target(context: Any) -> Any:
    target = getattr(context, "aws_target", None)
    if target is not None:
        return target
    from infra.aws.clients import AwsTarget  # boto3 only: safe inside the Lambda runtime

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise RecoveryError("AWS_REGION is not set (the Lambda runtime always sets it)")
    return AwsTarget(region=region)


def _settings(context: Any) -> dict[str, Any]:
    env = getattr(context, "environment", None) or os.environ
    raw = env.get(SETTINGS_ENV)
    if not raw:
        raise RecoveryError(f"{SETTINGS_ENV} is not set in the function's environment; "
                            f"redeploy with infra.ha.deploy")
    return json.loads(raw)


def _spec(s: dict[str, Any]) -> hb.VolumeSpec:
    return hb.VolumeSpec(device=s["device"], size_gib=int(s["size_gib"]),
                         volume_type=s["volume_type"])


def _emulator_not_implemented(exc: Exception) -> bool:
    """moto answers an unimplemented call with an HTML 500 page (or a bare 500 error)."""
    if isinstance(exc, ResponseParserError):
        return "500 Internal Server Error" in str(exc)
    if isinstance(exc, ClientError):
        meta = exc.response.get("ResponseMetadata", {})
        return meta.get("HTTPStatusCode") == 500
    return False


def complete_lifecycle_action(target: Any, detail: dict[str, Any], result: str = "CONTINUE",
                              ) -> str:
    """Release the instance from its Wait state.

    The embedded endpoint (moto 5.2.5) does not implement this call and answers 500: only
    there, and only that failure, is logged and tolerated. Against AWS any failure raises, so
    a broken hook is never mistaken for a completed one.
    """
    kwargs = {"AutoScalingGroupName": detail["AutoScalingGroupName"],
              "LifecycleHookName": detail["LifecycleHookName"],
              "InstanceId": detail["EC2InstanceId"], "LifecycleActionResult": result}
    if detail.get("LifecycleActionToken"):
        kwargs["LifecycleActionToken"] = detail["LifecycleActionToken"]
    try:
        target.client("autoscaling").complete_lifecycle_action(**kwargs)
        return "completed"
    except (ClientError, ResponseParserError) as e:
        if getattr(target, "embedded", False) and _emulator_not_implemented(e):
            log.warning("complete_lifecycle_action(%s, %s) is not implemented by the embedded "
                        "endpoint (HTTP 500); continuing as AWS would after %s",
                        kwargs["LifecycleHookName"], kwargs["InstanceId"], result)
            return "not-implemented-by-emulator"
        raise


# --------------------------------------------------------------------------- standby design


def _instances(ec2: Any, cluster: str, role: str) -> list[dict[str, Any]]:
    res = ec2.describe_instances(Filters=[
        {"Name": f"tag:{hb.TAG_CLUSTER}", "Values": [cluster]},
        {"Name": f"tag:{hb.TAG_ROLE}", "Values": [role]},
        {"Name": "instance-state-name",
         "Values": ["pending", "running", "stopping", "stopped", "shutting-down"]}])
    return [i for r in res["Reservations"] for i in r["Instances"]]


def _alarm_instance(alarm: dict[str, Any]) -> str | None:
    for metric in alarm.get("configuration", {}).get("metrics", []):
        dims = metric.get("metricStat", {}).get("metric", {}).get("dimensions", {})
        if "InstanceId" in dims:
            return dims["InstanceId"]
    return None


def _alarm(cw: Any, name: str) -> dict[str, Any]:
    found = cw.describe_alarms(AlarmNames=[name])["MetricAlarms"]
    if not found:
        raise RecoveryError(f"alarm {name} not found; redeploy with infra.ha.deploy")
    return found[0]


def _watched_instance(cw: Any, name: str) -> str | None:
    dims = {d["Name"]: d["Value"] for d in _alarm(cw, name).get("Dimensions", [])}
    return dims.get("InstanceId")


def _repoint_alarm(cw: Any, name: str, instance_id: str) -> None:
    """Watch the new primary: same alarm, new InstanceId dimension."""
    a = _alarm(cw, name)
    keep = ("AlarmDescription", "ActionsEnabled", "OKActions", "AlarmActions",
            "InsufficientDataActions", "MetricName", "Namespace", "Statistic", "Period",
            "EvaluationPeriods", "DatapointsToAlarm", "Threshold", "ComparisonOperator",
            "TreatMissingData")
    kwargs = {k: a[k] for k in keep if a.get(k) is not None}
    kwargs["Dimensions"] = [{"Name": "InstanceId", "Value": instance_id}]
    cw.put_metric_alarm(AlarmName=name, **kwargs)


def recovery_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Fail over to the standby: fence the primary, move the state, start it, move the EIP."""
    target, s = _target(context), _settings(context)
    ec2, cluster, delay = target.client("ec2"), s["cluster"], int(s.get("wait_delay", 5))
    alarm = event.get("alarmData", {})
    state = alarm.get("state", {}).get("value")
    if state != "ALARM":
        return {"action": "ignored", "reason": f"alarm state is {state}"}
    failed_id = _alarm_instance(alarm)
    if failed_id is None:
        raise RecoveryError("the alarm event names no InstanceId dimension")
    cw = target.client("cloudwatch")
    watched = _watched_instance(cw, s["alarm_name"])
    if watched != failed_id:
        # A repeated delivery after a completed failover: the alarm already watches the new
        # primary, and failing over again would undo the first.
        return {"action": "ignored", "reason": f"alarm now watches {watched}, not {failed_id}"}
    failed = hb.instance(ec2, failed_id)
    ftags = hb.tags_of(failed)
    if ftags.get(hb.TAG_CLUSTER) != cluster or ftags.get(hb.TAG_ROLE) != hb.ROLE_PRIMARY:
        return {"action": "ignored",
                "reason": f"{failed_id} is not the primary head of cluster {cluster}"}
    gone = failed["State"]["Name"] in ("shutting-down", "terminated")
    standbys = [i for i in _instances(ec2, cluster, hb.ROLE_STANDBY)
                if i["State"]["Name"] in ("stopped", "stopping")]
    if not standbys:
        raise RecoveryError(f"cluster {cluster} has no stopped standby (tag "
                            f"{hb.TAG_ROLE}={hb.ROLE_STANDBY}) to fail over to")
    standby = standbys[0]
    sid = standby["InstanceId"]

    # 1. Fence: a primary that is only impaired must not keep writing or answering.
    if failed["State"]["Name"] in ("pending", "running"):
        ec2.stop_instances(InstanceIds=[failed_id], Force=True)
    if not gone:
        ec2.get_waiter("instance_stopped").wait(
            InstanceIds=[failed_id], WaiterConfig={"Delay": delay, "MaxAttempts": 60})

    # 2. The state: a crash-consistent snapshot of the primary's volume, restored in the
    #    standby's AZ (EBS volumes never cross AZs; the standby may be in another one).
    volume = hb.attached_shared_volume(ec2, cluster, failed_id)
    if volume is None:
        vols = ec2.describe_volumes(Filters=[
            {"Name": f"tag:{hb.TAG_CLUSTER}", "Values": [cluster]},
            {"Name": f"tag:{hb.TAG_ROLE}", "Values": [hb.ROLE_VOLUME]},
            {"Name": f"tag:{hb.TAG_RESTORED_FOR}", "Values": [failed_id]}])["Volumes"]
        if not vols:
            raise RecoveryError(f"no shared volume of cluster {cluster} belongs to {failed_id}")
        volume = max(vols, key=lambda v: v["CreateTime"])
    snapshot_id = hb.snapshot_volume(ec2, cluster, volume["VolumeId"], reason="failover",
                                     instance_id=failed_id)
    stale = hb.attached_shared_volume(ec2, cluster, sid)
    while stale is not None:  # left from the standby's own earlier term as primary
        ec2.detach_volume(VolumeId=stale["VolumeId"], InstanceId=sid)
        ec2.get_waiter("volume_available").wait(
            VolumeIds=[stale["VolumeId"]], WaiterConfig={"Delay": delay, "MaxAttempts": 60})
        ec2.delete_volume(VolumeId=stale["VolumeId"])
        stale = hb.attached_shared_volume(ec2, cluster, sid)
    ident = hb.Identity(sid, standby["Placement"]["AvailabilityZone"], target.region)
    restored = hb.restore_shared_volume(ec2, cluster, ident, _spec(s), snapshot_id=snapshot_id,
                                        wait_delay=delay)

    # 3. Roles first (the standby's boot script reads its role), then start, then the EIP.
    ec2.create_tags(Resources=[sid], Tags=[{"Key": hb.TAG_ROLE, "Value": hb.ROLE_PRIMARY}])
    if not gone:
        ec2.create_tags(Resources=[failed_id],
                        Tags=[{"Key": hb.TAG_ROLE, "Value": hb.ROLE_STANDBY}])
    ec2.start_instances(InstanceIds=[sid])
    ec2.get_waiter("instance_running").wait(
        InstanceIds=[sid], WaiterConfig={"Delay": delay, "MaxAttempts": 60})
    address = hb.associate_eip(ec2, cluster, sid)
    _repoint_alarm(cw, s["alarm_name"], sid)
    pruned = hb.prune_snapshots(ec2, cluster, int(s["keep_snapshots"]))
    log.info("cluster %s failed over from %s to %s", cluster, failed_id, sid)
    return {"action": "failed-over", "old_instance": failed_id, "new_instance": sid,
            "old_az": failed["Placement"]["AvailabilityZone"],
            "new_az": ident.availability_zone, "old_volume_id": volume["VolumeId"],
            "snapshot_id": snapshot_id, "volume": restored, "eip": address,
            "standby_left": not gone,
            "pruned_snapshots": pruned}


# --------------------------------------------------------------------------- ASG design


# A retired volume's own last snapshot. A separate role: restores and the shared-snapshot
# pruning never see it, so an old head's volume can never be restored in place of the state
# the running head saved.
ROLE_RETIRED = "retired-volume-snapshot"
TAG_KEEP = "clusterflow:keep"  # on a volume: never retire it


def retire_detached_volumes(ec2: Any, cluster: str, keep: str | None = None, *,
                            wait_delay: int = 5, wait_attempts: int = 0,
                            keep_snapshots: int = 5) -> dict[str, list[str]]:
    """Snapshot, then delete, the cluster's detached shared volumes (all but ``keep``).

    An ASG replacement restores the newest snapshot into the new head's AZ; the old head's
    volume, detached by the termination, would otherwise bill forever. Its terminate snapshot
    is not enough to delete it: it was taken while the head still ran, and slurmctld writes
    until shutdown. So each detached volume first gets a snapshot of its own (taken now, after
    the detach: its final state), and is deleted only once that snapshot has completed, in
    this call (waiting up to ``wait_attempts`` polls) or a later one. A volume tagged
    ``clusterflow:keep`` is left alone. A failure on one volume is reported, not raised: the
    caller has finished its real work by then.
    """
    out: dict[str, list[str]] = {"deleted": [], "snapshotting": [], "kept": [], "failed": []}
    volumes = [v for v in ec2.describe_volumes(Filters=[
        *hb.cluster_filters(cluster, hb.ROLE_VOLUME),
        {"Name": "status", "Values": ["available"]}])["Volumes"] if v["VolumeId"] != keep]
    if not volumes:
        return out
    snaps = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        *hb.cluster_filters(cluster, ROLE_RETIRED),
        {"Name": "status", "Values": ["pending", "completed"]}])["Snapshots"]
    for v in volumes:
        vid = v["VolumeId"]
        if TAG_KEEP in hb.tags_of(v):
            out["kept"].append(vid)
            continue
        try:
            mine = [s for s in snaps if s["VolumeId"] == vid]
            if not mine:
                snap = ec2.create_snapshot(
                    VolumeId=vid, Description=f"clusterflow {cluster} retired shared volume",
                    TagSpecifications=hb.tag_spec("snapshot", {
                        hb.TAG_CLUSTER: cluster, hb.TAG_ROLE: ROLE_RETIRED,
                        hb.TAG_TAKEN_AT: str(time.time_ns())}))
                mine = [{"SnapshotId": snap["SnapshotId"], "State": snap.get("State")}]
            done = any(s.get("State") == "completed" for s in mine)
            if not done and wait_attempts > 0:
                ec2.get_waiter("snapshot_completed").wait(
                    SnapshotIds=[mine[0]["SnapshotId"]],
                    WaiterConfig={"Delay": wait_delay, "MaxAttempts": wait_attempts})
                done = True
            if done:
                ec2.delete_volume(VolumeId=vid)
                out["deleted"].append(vid)
            else:
                out["snapshotting"].append(vid)
        except (ClientError, WaiterError) as e:
            log.warning("cluster %s: could not retire volume %s: %s", cluster, vid, e)
            out["failed"].append(vid)
    try:
        hb.prune_snapshots(ec2, cluster, keep_snapshots, role=ROLE_RETIRED)
    except ClientError as e:
        log.warning("cluster %s: could not prune retired-volume snapshots: %s", cluster, e)
    return out


def _hook_detail(event: dict[str, Any], transition: str) -> dict[str, Any] | None:
    detail = event.get("detail", {})
    return detail if detail.get("LifecycleTransition") == transition else None


def terminate_hook_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Snapshot the leaving head's shared volume, then let the termination go on."""
    target, s = _target(context), _settings(context)
    detail = _hook_detail(event, "autoscaling:EC2_INSTANCE_TERMINATING")
    if detail is None:
        return {"action": "ignored", "reason": "not a terminate lifecycle action"}
    ec2, cluster, iid = target.client("ec2"), s["cluster"], detail["EC2InstanceId"]
    volume = hb.attached_shared_volume(ec2, cluster, iid)
    snapshot_id = None
    if volume is not None:
        # The snapshot is point-in-time at this call; EBS completes it after the instance is
        # gone (the volume is not deleted on termination), so the hook need not wait.
        snapshot_id = hb.snapshot_volume(ec2, cluster, volume["VolumeId"], reason="terminate",
                                         instance_id=iid)
    else:
        log.warning("instance %s has no shared volume of cluster %s attached", iid, cluster)
    pruned = hb.prune_snapshots(ec2, cluster, int(s["keep_snapshots"]))
    lifecycle = complete_lifecycle_action(target, detail)
    return {"action": "snapshotted" if snapshot_id else "nothing-to-snapshot",
            "instance_id": iid, "volume_id": volume["VolumeId"] if volume else None,
            "snapshot_id": snapshot_id, "pruned_snapshots": pruned, "lifecycle": lifecycle}


def launch_hook_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Restore the newest snapshot as a volume in the new head's AZ and attach it."""
    target, s = _target(context), _settings(context)
    detail = _hook_detail(event, "autoscaling:EC2_INSTANCE_LAUNCHING")
    if detail is None:
        return {"action": "ignored", "reason": "not a launch lifecycle action"}
    ec2, cluster, iid = target.client("ec2"), s["cluster"], detail["EC2InstanceId"]
    inst = hb.instance(ec2, iid)
    ident = hb.Identity(iid, inst["Placement"]["AvailabilityZone"], target.region)
    restored = hb.restore_shared_volume(ec2, cluster, ident, _spec(s),
                                        wait_delay=int(s.get("wait_delay", 5)))
    lifecycle = complete_lifecycle_action(target, detail)
    # After the restore: the old head's volume, detached by its termination, is snapshotted
    # once more and deleted (it would otherwise bill on, unused). Waits at most ~5 min; a
    # snapshot still running then is finished by the next hook.
    delay = int(s.get("wait_delay", 5))
    retired = retire_detached_volumes(
        ec2, cluster, keep=restored["volume_id"], wait_delay=delay,
        wait_attempts=max(1, 300 // max(delay, 1)), keep_snapshots=int(s["keep_snapshots"]))
    return {"action": "restored", "instance_id": iid, "availability_zone": ident.availability_zone,
            "volume": restored, "lifecycle": lifecycle, "retired_volumes": retired}
