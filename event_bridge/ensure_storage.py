"""The fabric's S3 buckets (and their notifications) and its DynamoDB dedup table.

Part of ``event_bridge.apply``. A bucket's notification configuration is shared with
whoever else uses the bucket, so the fabric's entries are merged in by Id, never replacing
the rest; the dedup table is created once (concurrent creators are fine) with TTL on.
"""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from event_bridge.fabric import BucketSpec


def ensure_bucket(s3: Any, name: str, region: str, changes: list[str]) -> None:
    try:
        s3.head_bucket(Bucket=name)
        return
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("404", "NoSuchBucket", "NotFound"):
            raise
    kwargs: dict[str, Any] = {}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    s3.create_bucket(Bucket=name, **kwargs)
    # Parts of a multipart upload whose process was killed are billed until aborted; on a
    # bucket we create, S3 aborts them after a week (the stager also reclaims its own).
    s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={"Rules": [{
        "ID": "clusterflow-abort-incomplete-multipart", "Status": "Enabled",
        "Filter": {"Prefix": ""}, "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7}}]})
    changes.append(f"created bucket {name}")


def ensure_bucket_notifications(s3: Any, spec: BucketSpec, queue_arns: dict[str, str],
                                changes: list[str]) -> None:
    """Merge the fabric's notifications into the bucket's, keeping everyone else's.

    PutBucketNotificationConfiguration replaces the whole configuration, so it is read,
    merged by notification Id and written back only when it differs.
    """
    current = s3.get_bucket_notification_configuration(Bucket=spec.name)
    current.pop("ResponseMetadata", None)
    ours = {n.id for n in spec.queue_notifications}
    wanted = {k: v for k, v in current.items() if v or k == "EventBridgeConfiguration"}
    queues = [c for c in current.get("QueueConfigurations", []) if c.get("Id") not in ours]
    for n in spec.queue_notifications:
        entry: dict[str, Any] = {"Id": n.id, "QueueArn": queue_arns[n.queue],
                                 "Events": list(n.events)}
        rules = [{"Name": k, "Value": v} for k, v in (("prefix", n.prefix), ("suffix", n.suffix))
                 if v]
        if rules:
            entry["Filter"] = {"Key": {"FilterRules": rules}}
        queues.append(entry)
    if queues:
        wanted["QueueConfigurations"] = queues
    else:
        wanted.pop("QueueConfigurations", None)
    if spec.eventbridge:
        wanted["EventBridgeConfiguration"] = {}
    if _canonical(wanted) != _canonical(current):
        s3.put_bucket_notification_configuration(Bucket=spec.name,
                                                 NotificationConfiguration=wanted)
        changes.append(f"updated bucket {spec.name}: notifications")


def _canonical(config: dict[str, Any]) -> Any:
    def rules(c: dict[str, Any]) -> Any:
        c = dict(c)
        fr = c.get("Filter", {}).get("Key", {}).get("FilterRules")
        if fr is not None:
            c["Filter"] = sorted((r["Name"].lower(), r["Value"]) for r in fr)
        c["Events"] = sorted(c.get("Events", []))
        return c

    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, list):
            if value:
                out[key] = sorted((rules(v) for v in value), key=lambda c: c.get("Id", ""))
        else:
            out[key] = value
    return json.dumps(out, sort_keys=True)




def ensure_dedup_table(ddb: Any, table: str, changes: list[str]) -> None:
    try:
        status = ddb.describe_table(TableName=table)["Table"]["TableStatus"]
    except ClientError as e:
        if e.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        try:
            ddb.create_table(
                TableName=table, BillingMode="PAY_PER_REQUEST",
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}])
            changes.append(f"created table {table}")
        except ClientError as e2:  # created concurrently by another consumer: fine
            if e2.response["Error"]["Code"] != "ResourceInUseException":
                raise
        status = "CREATING"
    if status != "ACTIVE":
        ddb.get_waiter("table_exists").wait(TableName=table,
                                            WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    ttl = ddb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        ddb.update_time_to_live(TableName=table, TimeToLiveSpecification={
            "Enabled": True, "AttributeName": "expires_at"})
        changes.append(f"enabled TTL on table {table}")
