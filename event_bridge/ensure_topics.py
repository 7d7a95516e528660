"""SNS topics of a fabric and their subscriptions: create once, then keep up to date.

Part of ``event_bridge.apply``. A topic is never re-created (AWS refuses CreateTopic for an
existing topic whose attributes differ); a subscription is made once per endpoint and its
attributes follow the fabric, including a filter policy the fabric dropped.
"""

from __future__ import annotations

import json
from typing import Any

from event_bridge.ensure_queues import same_attr
from event_bridge.fabric import TopicSpec


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
    if not same_attr(current, policy):
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
        if not same_attr(current.get(key), value):
            sns.set_subscription_attributes(SubscriptionArn=arn, AttributeName=key,
                                            AttributeValue=value)
            changes.append(f"updated subscription {label}: {key}")
    if "FilterPolicy" not in attributes and current.get("FilterPolicy"):
        sns.set_subscription_attributes(SubscriptionArn=arn, AttributeName="FilterPolicy",
                                        AttributeValue="")
        changes.append(f"updated subscription {label}: FilterPolicy removed")
    return arn
