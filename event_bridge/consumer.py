"""Consume result-manifest events from a fan-out queue and verify them against S3.

A message is deleted only after its manifest's checksums were verified; a message that cannot
be parsed or verified is left alone, so SQS redelivers it and, after ``maxReceiveCount``
receives, moves it to the queue's DLQ. Nothing is lost and nothing bad is acknowledged.

A run's consume stage (``consume_until``) acts on its own event only. The fan-out queues are
shared: another run's event, or a stale one whose manifest is gone, is released at once for
its own consumer (``events drain``, or the other run) and never fails this run; one that
nobody takes is dead-lettered by SQS after ``maxReceiveCount`` receives, like any poison.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from event_bridge.s3_events import NotAnS3Event, parse_s3_events
from infra.aws.clients import AwsTarget
from infra.staging.objects import object_sha256, streamed_sha256

log = logging.getLogger(__name__)


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
    # Events of other runs (or stale ones) seen and released untouched for their consumer.
    left: list[str] = field(default_factory=list)


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
                  timeout_s: float = 30.0, bucket: str | None = None) -> QueueReport:
    """Process messages until the event for ``want_key`` has been verified (or time runs out).

    Only this run's event (``want_key``, in ``bucket`` if given) is verified and acknowledged,
    and only its failure fails the run. Every other event is not this run's: it is made
    visible again at once, untouched, so its own consumer gets it (acknowledging it here
    would steal a concurrent run's event; verifying it could fail on a manifest long gone).
    Malformed messages are left alone for SQS's redrive to the DLQ, as before.
    """
    sqs = aws.client("sqs")
    report = QueueReport(queue=queue)
    deadline = time.monotonic() + timeout_s
    while want_key not in report.keys:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            hint = plain_moto_hint(aws)
            raise TimeoutError(
                f"queue {queue}: no event for s3://.../{want_key} within {timeout_s:.0f} s "
                f"(received {report.received}, {len(report.left)} of other runs); "
                + (hint or "check the EventBridge rule and SNS subscription"))
        resp = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                   WaitTimeSeconds=max(1, min(5, int(remaining))))
        for msg in resp.get("Messages", []):
            report.received += 1
            try:
                event = parse_event(msg["Body"])
            except PoisonMessage as e:
                # Not deleted: redelivered after the visibility timeout, then the DLQ.
                report.failed.append(str(e))
                continue
            if event.key != want_key or (bucket is not None and event.bucket != bucket):
                _release(sqs, queue_url, msg)
                report.left.append(f"s3://{event.bucket}/{event.key}")
                continue
            try:
                verify_manifest(aws, event)
            except (PoisonMessage, ManifestMismatch) as e:
                report.failed.append(str(e))  # not deleted: retried, then the DLQ
                raise
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=msg["ReceiptHandle"])
            report.verified += 1
            report.keys.append(event.key)
    return report


def _release(sqs: Any, queue_url: str, msg: dict[str, Any]) -> None:
    """Hand a message back untouched; its receive count still grows (SQS's poison rule)."""
    try:
        sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=msg["ReceiptHandle"],
                                      VisibilityTimeout=0)
    except ClientError as e:  # the receipt expired: it is visible again anyway
        log.warning("could not release message %s: %s", msg.get("MessageId"), e)


def plain_moto_hint(aws: AwsTarget) -> str | None:
    """Say so when the endpoint is a plain ``moto_server``, which cannot fan out to SNS.

    Plain moto drops EventBridge -> SNS deliveries (see ``infra.aws.moto_gaps.fanout``), so a
    run's manifest event never reaches its queues. Its TestEventPattern answers with an empty
    body, which clusterflow's endpoint (``python -m infra.aws.moto_server``) does not: a
    read-only probe, asked only after an event failed to arrive.
    """
    if not aws.endpoint_url:
        return None
    probe = {"id": "1", "account": "123456789012", "source": "clusterflow.probe",
             "time": "2026-01-01T00:00:00Z", "region": aws.region, "resources": [],
             "detail-type": "probe", "detail": {}}
    try:
        resp = aws.client("events").test_event_pattern(
            EventPattern=json.dumps({"source": ["clusterflow.probe"]}), Event=json.dumps(probe))
    except (ClientError, BotoCoreError):
        return None
    if "Result" in resp:
        return None
    return (f"the endpoint {aws.endpoint_url} is a plain moto_server, which cannot deliver "
            "EventBridge -> SNS; start `python -m infra.aws.moto_server -H 127.0.0.1 -p PORT` "
            "and point AWS_ENDPOINT_URL at it")
