"""The fan-out topology: S3 -> EventBridge rule -> SNS topic -> SQS queues (each with a DLQ).

Applied idempotently (create or update, never duplicate), so running a pipeline twice against
the same account or endpoint converges on one topology. Policies are the ones real AWS needs
(EventBridge may publish to the topic, the topic may send to each queue); moto stores them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from botocore.exceptions import ClientError

from infra.aws import AwsTarget


@dataclass(frozen=True)
class FanOutTopology:
    results_bucket: str
    key_prefix: str
    key_suffix: str
    topic: str
    queues: tuple[str, ...]
    max_receive_count: int = 3
    visibility_timeout: int = 300

    @property
    def rule_name(self) -> str:
        return f"{self.topic}-{self.key_suffix.replace('.', '-')}"

    def event_pattern(self) -> dict:
        """S3 "Object Created" events for ``<prefix>*<suffix>`` in the results bucket only.

        ``wildcard`` expresses prefix AND suffix in one filter; a list of ``prefix`` and
        ``suffix`` filters would be an OR. Every put also emits "Object Tags Added", which the
        ``detail-type`` filter drops.
        """
        return {
            "source": ["aws.s3"],
            "detail-type": ["Object Created"],
            "detail": {
                "bucket": {"name": [self.results_bucket]},
                "object": {"key": [{"wildcard": f"{self.key_prefix}*{self.key_suffix}"}]},
            },
        }


@dataclass
class AppliedTopology:
    rule_arn: str
    topic_arn: str
    queue_urls: dict[str, str] = field(default_factory=dict)
    dlq_urls: dict[str, str] = field(default_factory=dict)


def _queue_arn(sqs, url: str) -> str:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    return attrs["Attributes"]["QueueArn"]


def _ensure_queue(sqs, name: str, attributes: dict[str, str]) -> str:
    try:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as e:
        if e.response["Error"]["Code"] not in (
            "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist",
        ):
            raise
        return sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    return url


def _enable_eventbridge_notifications(s3, bucket: str) -> None:
    """Turn on S3 -> EventBridge while keeping any notifications the bucket already has."""
    current = s3.get_bucket_notification_configuration(Bucket=bucket)
    current.pop("ResponseMetadata", None)
    if "EventBridgeConfiguration" in current:
        return
    current["EventBridgeConfiguration"] = {}
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=current)


def apply_topology(aws: AwsTarget, topo: FanOutTopology) -> AppliedTopology:
    s3, events, sns, sqs = (aws.client(s) for s in ("s3", "events", "sns", "sqs"))

    topic_arn = sns.create_topic(Name=topo.topic)["TopicArn"]
    rule_arn = events.put_rule(
        Name=topo.rule_name,
        EventPattern=json.dumps(topo.event_pattern()),
        State="ENABLED",
        Description=f"Result manifests in s3://{topo.results_bucket}/{topo.key_prefix} -> SNS",
    )["RuleArn"]
    sns.set_topic_attributes(
        TopicArn=topic_arn, AttributeName="Policy",
        AttributeValue=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "EventBridgePublish", "Effect": "Allow",
                "Principal": {"Service": "events.amazonaws.com"},
                "Action": "sns:Publish", "Resource": topic_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": rule_arn}},
            }],
        }),
    )
    events.put_targets(Rule=topo.rule_name, Targets=[{"Id": "fanout-topic", "Arn": topic_arn}])

    applied = AppliedTopology(rule_arn=rule_arn, topic_arn=topic_arn)
    existing = {
        s["Endpoint"]
        for page in sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn)
        for s in page["Subscriptions"]
    }
    for name in topo.queues:
        dlq_url = _ensure_queue(sqs, f"{name}-dlq", {"MessageRetentionPeriod": "1209600"})
        url = _ensure_queue(sqs, name, {
            "VisibilityTimeout": str(topo.visibility_timeout),
            "RedrivePolicy": json.dumps({
                "deadLetterTargetArn": _queue_arn(sqs, dlq_url),
                "maxReceiveCount": str(topo.max_receive_count),
            }),
        })
        queue_arn = _queue_arn(sqs, url)
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "TopicSend", "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage", "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
            }],
        })})
        if queue_arn not in existing:
            sns.subscribe(
                TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn,
                Attributes={"RawMessageDelivery": "true"}, ReturnSubscriptionArn=True,
            )
        applied.queue_urls[name] = url
        applied.dlq_urls[name] = dlq_url

    _enable_eventbridge_notifications(s3, topo.results_bucket)
    return applied
