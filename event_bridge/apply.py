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

from event_bridge.fabric import ArchiveSpec, BucketSpec, Fabric, QueueSpec, RuleSpec, TopicSpec
from infra.aws.clients import AwsTarget

MISSING_QUEUE = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")


class PatternCheckFailed(ValueError):
    """A rule's pattern does not (or does) match an example the fabric says it should (not)."""


@dataclass
class QueueRef:
    name: str
    url: str
    arn: str
    dlq_url: str | None = None
    dlq_arn: str | None = None
    max_receive_count: int | None = None
    visibility_timeout: int = 300
    fifo: bool = False


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


# ---------------------------------------------------------------- queues


def queue_url_or_none(sqs: Any, name: str) -> str | None:
    try:
        return sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as e:
        if e.response["Error"]["Code"] not in MISSING_QUEUE:
            raise
        return None


def ensure_queue(sqs: Any, name: str, attributes: dict[str, str], changes: list[str],
                 create_only: dict[str, str] | None = None) -> tuple[str, str]:
    """(url, arn) of queue ``name`` with ``attributes``; ``create_only`` ones (FifoQueue) are
    given at creation only, since SQS refuses to change them later."""
    url = queue_url_or_none(sqs, name)
    if url is None:
        url = sqs.create_queue(QueueName=name,
                               Attributes={**(create_only or {}), **attributes})["QueueUrl"]
        changes.append(f"created queue {name}")
    else:
        current = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]).get(
            "Attributes", {})
        differ = {k: v for k, v in attributes.items() if not _same_attr(current.get(k), v)}
        if differ:
            sqs.set_queue_attributes(QueueUrl=url, Attributes=differ)
            changes.append(f"updated queue {name}: {', '.join(sorted(differ))}")
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"]
    return url, arn


def _same_attr(current: str | None, wanted: str) -> bool:
    if current == wanted:
        return True
    if current is None:
        return False
    try:  # JSON attributes (RedrivePolicy, Policy) compare by value, numbers as strings
        return _normalise(json.loads(current)) == _normalise(json.loads(wanted))
    except ValueError:
        return False


def _normalise(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _normalise(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_normalise(v) for v in doc]
    return str(doc) if isinstance(doc, (int, float)) and not isinstance(doc, bool) else doc


def ensure_queue_with_dlq(sqs: Any, spec: QueueSpec, changes: list[str]) -> QueueRef:
    create_only = {"FifoQueue": "true"} if spec.fifo else {}
    fifo_attrs = ({"ContentBasedDeduplication": str(spec.content_based_deduplication).lower()}
                  if spec.fifo else {})
    dlq_url = dlq_arn = None
    attributes = {
        "VisibilityTimeout": str(spec.visibility_timeout),
        "MessageRetentionPeriod": str(spec.retention_seconds),
        "ReceiveMessageWaitTimeSeconds": str(spec.wait_time_seconds),
        **fifo_attrs,
    }
    if spec.dead_letter:
        dlq_url, dlq_arn = ensure_queue(
            sqs, spec.dlq_name,
            {"MessageRetentionPeriod": str(spec.dlq_retention_seconds), **fifo_attrs},
            changes, create_only)
        attributes["RedrivePolicy"] = json.dumps({
            "deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(spec.max_receive_count)})
    url, arn = ensure_queue(sqs, spec.name, attributes, changes, create_only)
    return QueueRef(name=spec.name, url=url, arn=arn, dlq_url=dlq_url, dlq_arn=dlq_arn,
                    max_receive_count=spec.max_receive_count if spec.dead_letter else None,
                    visibility_timeout=spec.visibility_timeout, fifo=spec.fifo)


def allow_senders_policy(queue_arn: str, senders: dict[str, list[str]]) -> str:
    """A queue policy letting each service principal send only from the listed source ARNs."""
    statements = [{
        "Sid": f"{service.split('.')[0].capitalize()}Send", "Effect": "Allow",
        "Principal": {"Service": service}, "Action": "sqs:SendMessage", "Resource": queue_arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": arns[0] if len(arns) == 1 else arns}},
    } for service, arns in sorted(senders.items()) if arns]
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def ensure_policy(sqs: Any, ref: QueueRef, policy: str, changes: list[str]) -> None:
    current = sqs.get_queue_attributes(QueueUrl=ref.url, AttributeNames=["Policy"]).get(
        "Attributes", {}).get("Policy")
    if not _same_attr(current, policy):
        sqs.set_queue_attributes(QueueUrl=ref.url, Attributes={"Policy": policy})
        changes.append(f"updated queue {ref.name}: Policy")


# ---------------------------------------------------------------- topics


def ensure_topic(sns: Any, spec: TopicSpec, changes: list[str]) -> str:
    """The topic's ARN; created once, its deduplication setting kept up to date.

    Not CreateTopic every time: AWS refuses it for an existing topic whose attributes differ.
    """
    arn = find_topic(sns, spec.name)
    if arn is None:
        attributes = {}
        if spec.fifo:
            attributes = {"FifoTopic": "true", "ContentBasedDeduplication":
                          str(spec.content_based_deduplication).lower()}
        arn = sns.create_topic(Name=spec.name, Attributes=attributes)["TopicArn"]
        changes.append(f"created topic {spec.name}")
    elif spec.fifo:
        wanted = str(spec.content_based_deduplication).lower()
        current = sns.get_topic_attributes(TopicArn=arn)["Attributes"].get(
            "ContentBasedDeduplication", "false")
        if current != wanted:
            sns.set_topic_attributes(TopicArn=arn, AttributeName="ContentBasedDeduplication",
                                     AttributeValue=wanted)
            changes.append(f"updated topic {spec.name}: ContentBasedDeduplication")
    return arn


def find_topic(sns: Any, name: str) -> str | None:
    for page in sns.get_paginator("list_topics").paginate():
        for t in page["Topics"]:
            if t["TopicArn"].rsplit(":", 1)[-1] == name:
                return t["TopicArn"]
    return None


def ensure_topic_policy(sns: Any, name: str, topic_arn: str, publishers: list[str],
                        changes: list[str]) -> None:
    if not publishers:
        return
    policy = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "EventBridgePublish", "Effect": "Allow",
        "Principal": {"Service": "events.amazonaws.com"},
        "Action": "sns:Publish", "Resource": topic_arn,
        "Condition": {"ArnEquals": {
            "aws:SourceArn": publishers[0] if len(publishers) == 1 else publishers}},
    }]})
    current = sns.get_topic_attributes(TopicArn=topic_arn)["Attributes"].get("Policy")
    if not _same_attr(current, policy):
        sns.set_topic_attributes(TopicArn=topic_arn, AttributeName="Policy",
                                 AttributeValue=policy)
        changes.append(f"updated topic {name}: Policy")


def subscriptions_by_endpoint(sns: Any, topic_arn: str) -> dict[str, str]:
    subs: dict[str, str] = {}
    for page in sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn):
        for s in page["Subscriptions"]:
            if s["SubscriptionArn"] not in ("PendingConfirmation", "Deleted"):
                subs.setdefault(s["Endpoint"], s["SubscriptionArn"])
    return subs


def ensure_subscription(sns: Any, topic_arn: str, protocol: str, endpoint: str,
                        attributes: dict[str, str], changes: list[str], label: str,
                        existing: dict[str, str] | None = None) -> str:
    """Subscribe once per endpoint; on later applies bring the attributes up to date.

    An attribute the fabric dropped (a filter policy removed) is cleared, not left behind.
    """
    existing = subscriptions_by_endpoint(sns, topic_arn) if existing is None else existing
    arn = existing.get(endpoint)
    if arn is None:
        arn = sns.subscribe(TopicArn=topic_arn, Protocol=protocol, Endpoint=endpoint,
                            Attributes=attributes, ReturnSubscriptionArn=True)[
            "SubscriptionArn"]
        changes.append(f"subscribed {label}")
        return arn
    current = sns.get_subscription_attributes(SubscriptionArn=arn)["Attributes"]
    for key, value in attributes.items():
        if not _same_attr(current.get(key), value):
            sns.set_subscription_attributes(SubscriptionArn=arn, AttributeName=key,
                                            AttributeValue=value)
            changes.append(f"updated subscription {label}: {key}")
    if "FilterPolicy" not in attributes and current.get("FilterPolicy"):
        sns.set_subscription_attributes(SubscriptionArn=arn, AttributeName="FilterPolicy",
                                        AttributeValue="")
        changes.append(f"updated subscription {label}: FilterPolicy removed")
    return arn


# ---------------------------------------------------------------- rules and archives


def bus_arn(events: Any, bus: str, changes: list[str]) -> str:
    try:
        return events.describe_event_bus(Name=bus)["Arn"]
    except ClientError as e:
        if bus == "default" or e.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
    arn = events.create_event_bus(Name=bus)["EventBusArn"]
    changes.append(f"created event bus {bus}")
    return arn


def check_examples(events: Any, rule: RuleSpec) -> None:
    pattern = json.dumps(rule.pattern)
    for expected, examples in ((True, rule.examples.match), (False, rule.examples.no_match)):
        for example in examples:
            got = events.test_event_pattern(EventPattern=pattern,
                                            Event=json.dumps(example))["Result"]
            if got is not expected:
                raise PatternCheckFailed(
                    f"rule {rule.name}: its pattern {'does not match' if expected else 'matches'}"
                    f" the example event {json.dumps(example)[:300]}; fix the pattern or the "
                    f"example in the fabric")


def ensure_rule(events: Any, rule: RuleSpec, targets: list[dict[str, Any]],
                changes: list[str]) -> str:
    pattern = json.dumps(rule.pattern, sort_keys=True)
    try:
        current = events.describe_rule(Name=rule.name, EventBusName=rule.bus)
    except ClientError as e:
        if e.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        current = None
    wanted = {"EventPattern": rule.pattern, "State": "ENABLED",
              "Description": rule.description}
    if current is None or {
        "EventPattern": json.loads(current.get("EventPattern") or "null"),
        "State": current.get("State"), "Description": current.get("Description", ""),
    } != wanted:
        arn = events.put_rule(Name=rule.name, EventBusName=rule.bus, EventPattern=pattern,
                              State="ENABLED", Description=rule.description)["RuleArn"]
        changes.append(f"{'created' if current is None else 'updated'} rule {rule.name}")
    else:
        arn = current["Arn"]
    existing = {t["Id"]: t for page in events.get_paginator("list_targets_by_rule").paginate(
        Rule=rule.name, EventBusName=rule.bus) for t in page["Targets"]}
    stale = sorted(set(existing) - {t["Id"] for t in targets})
    if stale:
        events.remove_targets(Rule=rule.name, EventBusName=rule.bus, Ids=stale)
        changes.append(f"removed targets {', '.join(stale)} from rule {rule.name}")
    differ = [t for t in targets if _managed(existing.get(t["Id"])) != t]
    if differ:
        resp = events.put_targets(Rule=rule.name, EventBusName=rule.bus, Targets=differ)
        if resp.get("FailedEntryCount"):
            raise RuntimeError(f"rule {rule.name}: targets refused: {resp['FailedEntries']}")
        changes.append(f"put targets {', '.join(t['Id'] for t in differ)} on rule {rule.name}")
    return arn


_TARGET_KEYS = ("Id", "Arn", "InputTransformer", "SqsParameters", "Input", "InputPath")


def _managed(target: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if target is None else {k: v for k, v in target.items() if k in _TARGET_KEYS}


def ensure_archive(events: Any, spec: ArchiveSpec, source_arn: str, changes: list[str]) -> str:
    pattern = json.dumps(spec.pattern, sort_keys=True) if spec.pattern else None
    try:
        current = events.describe_archive(ArchiveName=spec.name)
    except ClientError as e:
        if e.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        kwargs: dict[str, Any] = {"ArchiveName": spec.name, "EventSourceArn": source_arn,
                                  "RetentionDays": spec.retention_days}
        if pattern:
            kwargs["EventPattern"] = pattern
        arn = events.create_archive(**kwargs)["ArchiveArn"]
        changes.append(f"created archive {spec.name}")
        return arn
    if current["EventSourceArn"] != source_arn:
        raise ValueError(f"archive {spec.name} exists on {current['EventSourceArn']}, not on "
                         f"{source_arn}; an archive cannot change bus: rename it in the fabric")
    now_pattern = json.loads(current["EventPattern"]) if current.get("EventPattern") else None
    if now_pattern != spec.pattern or int(current.get("RetentionDays", 0)) != spec.retention_days:
        kwargs = {"ArchiveName": spec.name, "RetentionDays": spec.retention_days}
        if pattern:
            kwargs["EventPattern"] = pattern
        events.update_archive(**kwargs)
        changes.append(f"updated archive {spec.name}")
    return current["ArchiveArn"]


# ---------------------------------------------------------------- buckets


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


# ---------------------------------------------------------------- dedup table


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
    for name, topic_arn in applied.topics.items():
        ensure_topic_policy(sns, name, topic_arn, sorted(set(publishers[name])), changes)
    for name, ref in applied.queues.items():
        who = {svc: sorted(set(arns)) for svc, arns in senders[name].items()}
        if who:
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
