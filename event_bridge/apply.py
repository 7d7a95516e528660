"""Make an AWS account (or the embedded endpoint) match a fabric: create or update, never dup.

Every step reads what exists first and changes only what differs, so a second ``apply`` of the
same fabric makes no change at all (``AppliedFabric.changes`` is empty) and a changed fabric
updates resources in place: attributes, filter policies, patterns, targets. Resources the
fabric does not declare are never touched, except stale targets on a rule the fabric owns.

Access is least-privilege: each topic lets only the rules that target it publish, each queue
lets only its topics, rules and buckets send. Rule patterns that carry examples are checked
with TestEventPattern before anything is created, so a wrong pattern fails the apply instead
of silently matching nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from event_bridge.ensure_queues import (
    QueueRef,
    allow_senders_policy,
    ensure_policy,
    ensure_queue_with_dlq,
    queue_url_or_none,
)
from event_bridge.ensure_rules import bus_arn, check_examples, ensure_archive, ensure_rule
from event_bridge.ensure_storage import (
    ensure_bucket,
    ensure_bucket_notifications,
    ensure_dedup_table,
)
from event_bridge.ensure_topics import (
    ensure_subscription,
    ensure_topic,
    ensure_topic_policy,
    find_topic,
    subscriptions_by_endpoint,
)
from event_bridge.fabric import Fabric
from event_bridge.grants import LiveSources, merged
from infra.aws.clients import AwsTarget


@dataclass
class AppliedFabric:
    queues: dict[str, QueueRef] = field(default_factory=dict)
    topics: dict[str, str] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)
    archives: dict[str, str] = field(default_factory=dict)
    buses: dict[str, str] = field(default_factory=dict)
    dedup_table: str = ""
    changes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "queues": {n: vars(q) for n, q in self.queues.items()},
            "topics": self.topics, "rules": self.rules, "archives": self.archives,
            "buses": self.buses, "dedup_table": self.dedup_table, "changes": self.changes,
        }


# ---------------------------------------------------------------- the whole fabric


def _target(tg: Any, topics: dict[str, str], queues: dict[str, QueueRef]) -> dict[str, Any]:
    target: dict[str, Any] = {"Id": tg.target_id,
                              "Arn": topics[tg.topic] if tg.topic else queues[tg.queue].arn}
    if tg.input_transformer is not None:
        target["InputTransformer"] = {"InputPathsMap": dict(tg.input_transformer.paths),
                                      "InputTemplate": tg.input_transformer.template}
    if tg.message_group_id:
        target["SqsParameters"] = {"MessageGroupId": tg.message_group_id}
    return target


def apply_fabric(aws: AwsTarget, fabric: Fabric) -> AppliedFabric:
    s3, events, sns, sqs, ddb = (aws.client(s)
                                 for s in ("s3", "events", "sns", "sqs", "dynamodb"))
    applied = AppliedFabric(dedup_table=fabric.dedup.table if fabric.dedup else "")
    changes = applied.changes

    for rule in fabric.rules:  # refuse a wrong pattern before anything is created
        check_examples(events, rule)
    for spec in fabric.queues:
        applied.queues[spec.name] = ensure_queue_with_dlq(sqs, spec, changes)
    for topic in fabric.topics:
        applied.topics[topic.name] = ensure_topic(sns, topic, changes)
    for bus in sorted({r.bus for r in fabric.rules} | {a.bus for a in fabric.archives}):
        applied.buses[bus] = bus_arn(events, bus, changes)
    for rule in fabric.rules:
        targets = [_target(t, applied.topics, applied.queues) for t in rule.targets]
        applied.rules[rule.name] = ensure_rule(events, rule, targets, changes)
    for archive in fabric.archives:
        applied.archives[archive.name] = ensure_archive(events, archive,
                                                        applied.buses[archive.bus], changes)

    # Who may send where: rules publish to topics; topics, rules and buckets send to queues.
    publishers: dict[str, list[str]] = {t: [] for t in applied.topics}
    senders: dict[str, dict[str, list[str]]] = {q: {} for q in applied.queues}
    for rule in fabric.rules:
        for tg in rule.targets:
            if tg.topic:
                publishers[tg.topic].append(applied.rules[rule.name])
            else:
                senders[tg.queue].setdefault("events.amazonaws.com", []).append(  # type: ignore[index]
                    applied.rules[rule.name])
    for topic in fabric.topics:
        for sub in topic.subscriptions:
            senders[sub.queue].setdefault("sns.amazonaws.com", []).append(
                applied.topics[topic.name])
    for bucket in fabric.buckets:
        for n in bucket.queue_notifications:
            senders[n.queue].setdefault("s3.amazonaws.com", []).append(
                f"arn:aws:s3:::{bucket.name}")
    # Topics and queues may be shared with other specs: their live grants are kept.
    live = LiveSources(aws)
    for name, topic_arn in applied.topics.items():
        if not publishers[name]:
            continue
        current = sns.get_topic_attributes(TopicArn=topic_arn)["Attributes"].get("Policy")
        who = merged({"events.amazonaws.com": publishers[name]}, current, live)
        ensure_topic_policy(sns, name, topic_arn, who["events.amazonaws.com"], changes)
    for name, ref in applied.queues.items():
        if not senders[name]:
            continue
        current = sqs.get_queue_attributes(QueueUrl=ref.url, AttributeNames=["Policy"]).get(
            "Attributes", {}).get("Policy")
        who = merged(senders[name], current, live)
        ensure_policy(sqs, ref, allow_senders_policy(ref.arn, who), changes)

    for topic in fabric.topics:
        topic_arn = applied.topics[topic.name]
        existing = subscriptions_by_endpoint(sns, topic_arn)
        for sub in topic.subscriptions:
            attrs = {"RawMessageDelivery": str(sub.raw).lower()}
            if sub.filter_policy is not None:
                attrs["FilterPolicy"] = json.dumps(sub.filter_policy, sort_keys=True)
                attrs["FilterPolicyScope"] = sub.filter_scope
            ensure_subscription(sns, topic_arn, "sqs", applied.queues[sub.queue].arn, attrs,
                                changes, f"{sub.queue} to {topic.name}", existing)

    for bucket in fabric.buckets:
        if bucket.create:
            ensure_bucket(s3, bucket.name, aws.region, changes)
        ensure_bucket_notifications(
            s3, bucket, {n: q.arn for n, q in applied.queues.items()}, changes)

    if fabric.dedup is not None:
        ensure_dedup_table(ddb, fabric.dedup.table, changes)
    return applied


def resolve_fabric(aws: AwsTarget, fabric: Fabric) -> AppliedFabric:
    """The ARNs and URLs of an applied fabric, read without changing anything."""
    sqs, sns, events = (aws.client(s) for s in ("sqs", "sns", "events"))
    out = AppliedFabric(dedup_table=fabric.dedup.table if fabric.dedup else "")
    missing = []
    for spec in fabric.queues:
        url = queue_url_or_none(sqs, spec.name)
        if url is None:
            missing.append(f"queue {spec.name}")
            continue
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        dlq_url = queue_url_or_none(sqs, spec.dlq_name) if spec.dead_letter else None
        dlq_arn = (sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"] if dlq_url else None)
        out.queues[spec.name] = QueueRef(
            spec.name, url, arn, dlq_url, dlq_arn,
            spec.max_receive_count if spec.dead_letter else None, spec.visibility_timeout,
            spec.fifo)
    for topic in fabric.topics:
        arn = find_topic(sns, topic.name)
        if arn is None:
            missing.append(f"topic {topic.name}")
        else:
            out.topics[topic.name] = arn
    for rule in fabric.rules:
        try:
            out.rules[rule.name] = events.describe_rule(Name=rule.name,
                                                        EventBusName=rule.bus)["Arn"]
        except ClientError:
            missing.append(f"rule {rule.name}")
    for archive in fabric.archives:
        try:
            out.archives[archive.name] = events.describe_archive(
                ArchiveName=archive.name)["ArchiveArn"]
        except ClientError:
            missing.append(f"archive {archive.name}")
    if missing:
        raise LookupError(f"the fabric is not applied here ({', '.join(missing)} missing); "
                          "run `clusterflow events apply` first")
    return out
