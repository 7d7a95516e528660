"""Consume result-manifest events from a fan-out queue and verify them against S3.

A message is deleted only after its manifest's checksums were verified; a message that cannot
be parsed or verified is left alone, so SQS redelivers it and, after ``maxReceiveCount``
receives, moves it to the queue's DLQ. Nothing is lost and nothing bad is acknowledged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from event_bridge.s3_events import NotAnS3Event, parse_s3_events
from infra.aws.clients import AwsTarget
from infra.staging.objects import object_sha256, streamed_sha256


class PoisonMessage(ValueError):
    """A message that is not a well-formed S3 'Object Created' manifest event."""


class ManifestMismatch(RuntimeError):
    """A manifest lists a file whose bytes in S3 do not match its checksum."""


@dataclass(frozen=True)
class ManifestEvent:
    event_id: str
    bucket: str
    key: str

    @property
    def prefix(self) -> str:
        return self.key.rsplit("/", 1)[0] + "/" if "/" in self.key else ""


@dataclass
class QueueReport:
    queue: str
    received: int = 0
    verified: int = 0
    failed: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


def parse_event(body: str) -> ManifestEvent:
    """Accept the EventBridge event, raw or wrapped in an SNS envelope (non-raw delivery)."""
    try:
        events = parse_s3_events(body)
    except NotAnS3Event as e:
        raise PoisonMessage(f"not an S3 Object Created event: {e}") from None
    if len(events) != 1 or events[0].event_id is None:
        raise PoisonMessage("not an S3 Object Created event: expected one EventBridge event "
                            f"with an id, got {len(events)} S3 event(s)")
    event = events[0]
    return ManifestEvent(event_id=event.event_id, bucket=event.bucket, key=event.key)


def verify_manifest(aws: AwsTarget, event: ManifestEvent) -> dict[str, Any]:
    """Check every file the manifest lists against the bytes S3 holds for it."""
    s3 = aws.client("s3")
    raw = s3.get_object(Bucket=event.bucket, Key=event.key)["Body"].read()
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise PoisonMessage(f"s3://{event.bucket}/{event.key} is not a manifest: {e}") from None
    for entry in files:
        key = event.prefix + entry["name"]
        digest = object_sha256(aws, event.bucket, key)
        if digest is None:
            digest, _ = streamed_sha256(aws, event.bucket, key)
        if digest != entry["sha256"]:
            raise ManifestMismatch(
                f"s3://{event.bucket}/{key}: sha256 {digest} does not match the manifest's "
                f"{entry['sha256']}"
            )
    return manifest


def consume_until(aws: AwsTarget, queue: str, queue_url: str, want_key: str,
                  timeout_s: float = 30.0) -> QueueReport:
    """Process messages until the event for ``want_key`` has been verified (or time runs out).

    Other valid manifest events met on the way (earlier runs) are verified and acknowledged
    too: they are real work for this consumer, not noise.
    """
    sqs = aws.client("sqs")
    report = QueueReport(queue=queue)
    deadline = time.monotonic() + timeout_s
    while want_key not in report.keys:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"queue {queue}: no event for s3://.../{want_key} within {timeout_s:.0f} s "
                f"(received {report.received}); check the EventBridge rule and SNS subscription"
            )
        resp = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                   WaitTimeSeconds=max(1, min(5, int(remaining))))
        for msg in resp.get("Messages", []):
            report.received += 1
            event = None
            try:
                event = parse_event(msg["Body"])
                verify_manifest(aws, event)
            except (PoisonMessage, ManifestMismatch) as e:
                # Not deleted: redelivered after the visibility timeout, then the DLQ.
                report.failed.append(str(e))
                if event is not None and event.key == want_key:
                    raise
                continue
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=msg["ReceiptHandle"])
            report.verified += 1
            report.keys.append(event.key)
    return report
