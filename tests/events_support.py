"""Handlers and builders the event-fabric tests share (importable by consumer subprocesses).

Side effects go to a DynamoDB counter table named by ``CLUSTERFLOW_TEST_COUNTS`` (one atomic
``ADD`` per processing), so a test can tell "processed once" from "processed twice" even
across processes that were killed.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from event_bridge.batch import sqs_batch_handler
from event_bridge.lambda_shapes import aws_for
from event_bridge.s3_events import parse_s3_events

COUNTS_ENV = "CLUSTERFLOW_TEST_COUNTS"


def tag() -> str:
    return uuid.uuid4().hex[:8]


def make_counter_table(aws: Any) -> str:
    name = f"counts-{tag()}"
    aws.client("dynamodb").create_table(
        TableName=name, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}])
    return name


def counts(aws: Any, table: str) -> dict[str, int]:
    items = aws.client("dynamodb").scan(TableName=table, ConsistentRead=True)["Items"]
    return {i["pk"]["S"]: int(i["n"]["N"]) for i in items}


def _count(context: Any, key: str) -> None:
    aws_for(context).client("dynamodb").update_item(
        TableName=os.environ[COUNTS_ENV], Key={"pk": {"S": key}},
        UpdateExpression="ADD n :one", ExpressionAttributeValues={":one": {"N": "1"}})


def event_body(event_id: str, **detail: Any) -> str:
    """An EventBridge-shaped body (so the dedup key is its id)."""
    return json.dumps({"version": "0", "id": event_id, "source": "clusterflow.test",
                       "detail-type": "Test Event", "time": "2026-01-01T00:00:00Z",
                       "detail": detail})


def _count_event(record: dict[str, Any], context: Any) -> None:
    doc = json.loads(record["body"])
    detail = doc["detail"]
    if detail.get("fail"):
        raise RuntimeError(f"event {doc['id']} is set to fail")
    if os.environ.get("CLUSTERFLOW_TEST_HANG_ON") == doc["id"]:
        Path(os.environ["CLUSTERFLOW_TEST_MARKER"]).write_text(doc["id"])
        time.sleep(120)  # killed here by the test
    _count(context, doc["id"])


def _count_s3(record: dict[str, Any], context: Any) -> None:
    for event in parse_s3_events(record["body"]):
        _count(context, event.key)


count_events = sqs_batch_handler(_count_event)
count_s3_objects = sqs_batch_handler(_count_s3)


def always_fail(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return {"batchItemFailures": [{"itemIdentifier": r["messageId"]}
                                  for r in event["Records"]]}
