"""What exists of a fabric right now: resources, their settings, depths and drift.

Read-only. Each declared resource is looked up and reported as it is, with ``missing`` when
absent and ``drift`` listing the settings that differ from the fabric, so ``show`` after
``apply`` is the check that the account matches the file.
"""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from event_bridge.ensure_queues import queue_url_or_none
from event_bridge.ensure_topics import find_topic
from event_bridge.fabric import Fabric
from infra.aws.clients import AwsTarget


def _queue(sqs: Any, name: str) -> dict[str, Any] | None:
    url = queue_url_or_none(sqs, name)
    if url is None:
        return None
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    out: dict[str, Any] = {
        "visible": int(a.get("ApproximateNumberOfMessages", 0)),
        "in_flight": int(a.get("ApproximateNumberOfMessagesNotVisible", 0)),
        "delayed": int(a.get("ApproximateNumberOfMessagesDelayed", 0)),
        "visibility_timeout": int(a.get("VisibilityTimeout", 30)),
    }
    if a.get("RedrivePolicy"):
        policy = json.loads(a["RedrivePolicy"])
        out["max_receive_count"] = int(policy["maxReceiveCount"])
        out["dlq"] = policy["deadLetterTargetArn"].rsplit(":", 1)[-1]
    return out


def pattern_drift(actual: Any, wanted: Any, path: str = "pattern") -> list[str]:
    """Each place a rule's live pattern differs from the fabric's, named by its path.

    So a rule rewritten by another spec reads ``pattern.detail.bucket.name is ["other"], the
    fabric says ["clusterflow-demo-results"]`` rather than a bare "differs".
    """
    if isinstance(actual, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for key in sorted(set(actual) | set(wanted), key=str):
            if key not in wanted:
                out.append(f"{path}.{key} is not in the fabric")
            elif key not in actual:
                out.append(f"{path}.{key} is missing")
            else:
                out.extend(pattern_drift(actual[key], wanted[key], f"{path}.{key}"))
        return out
    if actual == wanted:
        return []
    return [f"{path} is {json.dumps(actual)}, the fabric says {json.dumps(wanted)}"]


def drift_lines(report: dict[str, Any]) -> list[str]:
    """Every drift of a ``show`` report as ``<kind> <name>: <what>``, for text output."""
    return [f"{kind.rstrip('s')} {name}: {d}"
            for kind in ("queues", "topics", "rules", "buckets")
            for name, entry in report[kind].items() for d in entry.get("drift", [])]


def show(aws: AwsTarget, fabric: Fabric) -> dict[str, Any]:
    s3, events, sns, sqs, ddb = (aws.client(s)
                                 for s in ("s3", "events", "sns", "sqs", "dynamodb"))
    missing: list[str] = []
    report: dict[str, Any] = {"endpoint": aws.label, "queues": {}, "topics": {}, "rules": {},
                              "archives": {}, "buckets": {}, "consumers": []}

    for spec in fabric.queues:
        q = _queue(sqs, spec.name)
        if q is None:
            missing.append(f"queue {spec.name}")
            report["queues"][spec.name] = {"missing": True}
            continue
        drift = []
        if q["visibility_timeout"] != spec.visibility_timeout:
            drift.append(f"visibility_timeout {q['visibility_timeout']} != "
                         f"{spec.visibility_timeout}")
        if spec.dead_letter:
            if q.get("dlq") != spec.dlq_name:
                drift.append(f"dlq {q.get('dlq')} != {spec.dlq_name}")
            if q.get("max_receive_count") != spec.max_receive_count:
                drift.append(f"max_receive_count {q.get('max_receive_count')} != "
                             f"{spec.max_receive_count}")
            dlq = _queue(sqs, spec.dlq_name)
            q["dlq_depth"] = dlq["visible"] + dlq["in_flight"] if dlq else None
        q["drift"] = drift
        report["queues"][spec.name] = q

    for topic in fabric.topics:
        arn = find_topic(sns, topic.name)
        if arn is None:
            missing.append(f"topic {topic.name}")
            report["topics"][topic.name] = {"missing": True}
            continue
        subs = []
        for page in sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=arn):
            for s in page["Subscriptions"]:
                entry = {"protocol": s["Protocol"], "endpoint": s["Endpoint"]}
                if s["SubscriptionArn"].startswith("arn:"):
                    attrs = sns.get_subscription_attributes(
                        SubscriptionArn=s["SubscriptionArn"])["Attributes"]
                    if attrs.get("FilterPolicy"):
                        entry["filter_policy"] = json.loads(attrs["FilterPolicy"])
                        entry["filter_scope"] = attrs.get("FilterPolicyScope",
                                                          "MessageAttributes")
                    entry["raw"] = attrs.get("RawMessageDelivery") == "true"
                subs.append(entry)
        declared = {sub.queue for sub in topic.subscriptions}
        present = {s["endpoint"].rsplit(":", 1)[-1] for s in subs if s["protocol"] == "sqs"}
        report["topics"][topic.name] = {
            "arn": arn, "subscriptions": subs,
            "drift": [f"queue {q} not subscribed" for q in sorted(declared - present)]}

    for rule in fabric.rules:
        try:
            r = events.describe_rule(Name=rule.name, EventBusName=rule.bus)
        except ClientError:
            missing.append(f"rule {rule.name}")
            report["rules"][rule.name] = {"missing": True}
            continue
        targets = [t["Arn"] for t in events.list_targets_by_rule(
            Rule=rule.name, EventBusName=rule.bus)["Targets"]]
        pattern = json.loads(r.get("EventPattern") or "null")
        report["rules"][rule.name] = {
            "bus": rule.bus, "state": r.get("State"), "pattern": pattern, "targets": targets,
            "drift": pattern_drift(pattern, rule.pattern)}

    for archive in fabric.archives:
        try:
            a = events.describe_archive(ArchiveName=archive.name)
        except ClientError:
            missing.append(f"archive {archive.name}")
            report["archives"][archive.name] = {"missing": True}
            continue
        report["archives"][archive.name] = {
            "state": a.get("State"), "event_count": a.get("EventCount"),
            "retention_days": a.get("RetentionDays")}

    for bucket in fabric.buckets:
        try:
            config = s3.get_bucket_notification_configuration(Bucket=bucket.name)
        except ClientError:
            missing.append(f"bucket {bucket.name}")
            report["buckets"][bucket.name] = {"missing": True}
            continue
        ids = {c.get("Id") for c in config.get("QueueConfigurations", [])}
        drift = [f"notification {n.id} missing" for n in bucket.queue_notifications
                 if n.id not in ids]
        if bucket.eventbridge and "EventBridgeConfiguration" not in config:
            drift.append("EventBridge notifications off")
        report["buckets"][bucket.name] = {
            "eventbridge": "EventBridgeConfiguration" in config,
            "queue_notifications": sorted(i for i in ids if i), "drift": drift}

    if fabric.dedup is not None:
        try:
            t = ddb.describe_table(TableName=fabric.dedup.table)["Table"]
            report["dedup_table"] = {"name": fabric.dedup.table, "status": t["TableStatus"],
                                     "items": t.get("ItemCount")}
        except ClientError:
            missing.append(f"table {fabric.dedup.table}")
            report["dedup_table"] = {"name": fabric.dedup.table, "missing": True}

    report["consumers"] = [
        {"name": c.consumer_name, "source": f"queue {c.queue}" if c.queue else f"topic {c.topic}",
         "handler": c.handler, "background": c.background} for c in fabric.consumers]
    report["missing"] = missing
    report["in_sync"] = not missing and not any(
        r.get("drift") for kind in ("queues", "topics", "rules", "buckets")
        for r in report[kind].values())
    return report
