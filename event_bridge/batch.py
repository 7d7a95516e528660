"""Turn a per-record function into a Lambda SQS handler with partial batch responses.

``sqs_batch_handler(process)`` calls ``process(record, context)`` for each record of an SQS
batch; a record whose call raises is reported in ``batchItemFailures`` and only it is retried.
With ``idempotent=True`` each record is claimed in the dedup store first
(:mod:`event_bridge.idempotency`), so a duplicate delivery is acknowledged without running
``process`` again. On a FIFO queue, once a record of a message group fails, the group's later
records in the batch are not run and are reported failed too: processing them would break
the group's order (Lambda's rule for FIFO sources).

The result is a plain Lambda handler: deploy it as a function with ReportBatchItemFailures,
or run it with ``event_bridge.runtime``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from event_bridge.idempotency import DedupStore
from event_bridge.lambda_shapes import Handler, aws_for, dedup_table_for
from event_bridge.s3_events import NotAnS3Event, parse_s3_events, unwrap_sns

log = logging.getLogger(__name__)

RecordFn = Callable[[dict[str, Any], Any], Any]


def idempotency_key(record: dict[str, Any]) -> str:
    """What a record is about, identical for every delivery of the same event.

    S3 object events: the write they report (bucket, key, sequencer), whichever envelope or
    replay delivered them. Other EventBridge events: their id. SNS envelopes: the SNS message
    id. Anything else: the SQS message id, which is stable across redeliveries of one message.
    """
    body = record.get("body", "")
    try:
        events = parse_s3_events(body)
        if events:
            return "|".join(e.identity for e in events)
    except NotAnS3Event:
        pass
    try:
        doc = json.loads(body)
    except (ValueError, TypeError):
        doc = None
    if isinstance(doc, dict):
        inner = unwrap_sns(doc)
        if isinstance(inner, dict) and "detail-type" in inner and inner.get("id"):
            return f"event:{inner['id']}"
        if doc.get("Type") == "Notification" and doc.get("MessageId"):
            return f"sns:{doc['MessageId']}"
    return f"sqs:{record['messageId']}"


def _group(record: dict[str, Any]) -> str | None:
    return record.get("attributes", {}).get("MessageGroupId")


def sqs_batch_handler(process: RecordFn, *, idempotent: bool = True,
                      key: Callable[[dict[str, Any]], str] = idempotency_key) -> Handler:
    @functools.wraps(process)
    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        store = None
        if idempotent:
            store = DedupStore(aws_for(context), dedup_table_for(context))
        scope = getattr(context, "function_name", None) or process.__name__
        failed: list[str] = []
        broken_groups: set[str] = set()
        for record in event.get("Records", []):
            group = _group(record)
            if group is not None and group in broken_groups:
                failed.append(record["messageId"])
                continue
            try:
                if store is None:
                    process(record, context)
                else:
                    lease_s = max(1.0, context.get_remaining_time_in_millis() / 1000)
                    store.once(f"{scope}#{key(record)}", lease_s,
                               lambda r=record: process(r, context))
            except Exception as e:  # noqa: BLE001 - any handler error fails only this record
                log.warning("%s: message %s failed (receive %s): %s: %s", scope,
                            record["messageId"],
                            record.get("attributes", {}).get("ApproximateReceiveCount", "?"),
                            type(e).__name__, e)
                failed.append(record["messageId"])
                if group is not None:
                    broken_groups.add(group)
        return {"batchItemFailures": [{"itemIdentifier": i} for i in failed]}

    return handler
