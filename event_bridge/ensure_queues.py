"""SQS queues of a fabric: create or update in place, each with its DLQ and sender policy.

Part of ``event_bridge.apply``: every function reads what exists and changes only what
differs, so applying the same fabric twice changes nothing. JSON attributes (redrive policy,
access policy) compare by value, since SQS hands them back re-serialised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from event_bridge.fabric import QueueSpec

MISSING_QUEUE = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")

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
        differ = {k: v for k, v in attributes.items() if not same_attr(current.get(k), v)}
        if differ:
            sqs.set_queue_attributes(QueueUrl=url, Attributes=differ)
            changes.append(f"updated queue {name}: {', '.join(sorted(differ))}")
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"]
    return url, arn


def same_attr(current: str | None, wanted: str) -> bool:
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
    if not same_attr(current, policy):
        sqs.set_queue_attributes(QueueUrl=ref.url, Attributes={"Policy": policy})
        changes.append(f"updated queue {ref.name}: Policy")
