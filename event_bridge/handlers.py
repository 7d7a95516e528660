"""The stock consumers of the fabric, each a Lambda-signature handler.

``verify_results``     result-manifest events (postprocess, audit): every file the manifest
                       lists is checked against S3; a tampered result or a malformed event
                       fails and, after maxReceiveCount tries, sits in the DLQ.
``log_large_result``   large outputs (the EventBridge rule filters on object size).
``record_run_event``   per-run lifecycle events from the FIFO topic, in order per run.
``security_alert``     CloudTrail security-group / NACL changes from the alert topic (SNS), and
                       the guard's own block / unblock notices (``source: clusterflow.guard``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from event_bridge.batch import sqs_batch_handler
from event_bridge.consumer import ManifestEvent, PoisonMessage, verify_manifest
from event_bridge.lambda_shapes import aws_for
from event_bridge.run_events import parse_run_event
from event_bridge.s3_events import NotAnS3Event, parse_s3_events, unwrap_sns

log = logging.getLogger("clusterflow.events")


def _s3_events(record: dict[str, Any]) -> list[Any]:
    try:
        return parse_s3_events(record["body"])
    except NotAnS3Event as e:
        raise PoisonMessage(str(e)) from None


def _verify(record: dict[str, Any], context: Any) -> None:
    for event in _s3_events(record):
        if not event.created:
            continue
        verify_manifest(aws_for(context), ManifestEvent(event.event_id or "", event.bucket,
                                                        event.key))
        log.info("%s: verified %s", getattr(context, "function_name", "?"), event.uri)


def _large(record: dict[str, Any], context: Any) -> None:
    for event in _s3_events(record):
        log.info("large result %s (%s bytes)", event.uri, event.size)


def _run_event(record: dict[str, Any], context: Any) -> None:
    event = parse_run_event(record["body"])
    log.info("run %s: %s (%s)", event["detail"]["run_id"], event["detail"]["stage"],
             event["time"])


verify_results = sqs_batch_handler(_verify)
log_large_result = sqs_batch_handler(_large)
record_run_event = sqs_batch_handler(_run_event)


def security_alert(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """SNS-delivered CloudTrail API calls: who changed which security group or network ACL."""
    alerts = []
    for record in event["Records"]:
        doc = unwrap_sns(json.loads(record["Sns"]["Message"]))
        detail = doc["detail"]
        if doc.get("source") == "clusterflow.guard":
            alerts.append({"event": doc["detail-type"], "resource": detail["cidr"],
                           "by": detail.get("removed_by") or detail.get("by", "guard"),
                           "time": doc.get("time")})
            log.warning("guard: %s %s (%s)", doc["detail-type"], detail["cidr"],
                        detail.get("reason", ""))
            continue
        params = detail.get("requestParameters") or {}
        target = (params.get("groupId") or params.get("networkAclId")
                  or params.get("associationId") or "?")
        who = (detail.get("userIdentity") or {}).get("arn", "unknown principal")
        alerts.append({"event": detail["eventName"], "resource": target, "by": who,
                       "time": doc.get("time")})
        log.warning("network change: %s on %s by %s", detail["eventName"], target, who)
    return {"alerts": alerts}
