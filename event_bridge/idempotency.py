"""Process each event once, however often it is delivered: a DynamoDB conditional put.

SQS delivers at least once, SNS retries, a killed consumer's batch comes back, replays send
old events again. Before a handler touches an event it claims the event's key with a
conditional put that only succeeds if nobody completed it and nobody holds a live claim;
after success the claim becomes ``COMPLETED`` (kept ``retention_days`` by DynamoDB TTL); after
a failure it is released so the retry can claim it. A claim whose holder died expires after
``lease_s`` (the handler's timeout), so a crash never blocks an event for good.

Keys are scoped by consumer: the same event must still be processed once by *each* consumer
(postprocess and audit both read every result event).

Claims held by this process are tracked, so a consumer stopped by SIGINT/SIGTERM hands them
back (``release_held_claims``) instead of leaving the next run to wait out their lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from botocore.exceptions import ClientError

from event_bridge.ensure_storage import ensure_dedup_table
from infra.aws.clients import AwsTarget

log = logging.getLogger(__name__)
T = TypeVar("T")

IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"


class AlreadyProcessed(Exception):
    """The event was processed before (a duplicate delivery); nothing to do."""


class ClaimedElsewhere(RuntimeError):
    """Another consumer is processing this event right now; retry after its lease."""


_ready: set[tuple[AwsTarget, str]] = set()
_ready_lock = threading.Lock()
# (store, key) of every claim this process holds and has not completed or released yet.
_held: set[tuple[DedupStore, str]] = set()
_held_lock = threading.Lock()


def release_held_claims() -> int:
    """Release every claim this process still holds (on shutdown); how many were released."""
    with _held_lock:
        held = list(_held)
        _held.clear()
    released = 0
    for store, key in held:
        try:
            store.release(key)
            released += 1
        except ClientError as e:  # shutting down: report, do not mask the signal
            log.warning("could not release the claim on %s: %s", key, e)
    return released


class DedupStore:
    def __init__(self, aws: AwsTarget, table: str, retention_days: int = 14,
                 create: bool = True) -> None:
        self.aws = aws
        self.table = table
        self.retention_s = retention_days * 86400
        self._ddb = aws.client("dynamodb")
        if create:
            with _ready_lock:
                if (aws, table) not in _ready:
                    ensure_dedup_table(self._ddb, table, [])
                    _ready.add((aws, table))

    def claim(self, key: str, lease_s: float) -> None:
        """Take the event for processing, or raise AlreadyProcessed / ClaimedElsewhere."""
        now = time.time()
        try:
            self._ddb.put_item(
                TableName=self.table,
                Item={"pk": {"S": key}, "status": {"S": IN_PROGRESS},
                      "lease_until": {"N": f"{now + lease_s:.3f}"},
                      "expires_at": {"N": str(int(now + self.retention_s))}},
                ConditionExpression="attribute_not_exists(pk) OR "
                                    "(#s = :in_progress AND lease_until < :now)",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={":in_progress": {"S": IN_PROGRESS},
                                           ":now": {"N": f"{now:.3f}"}},
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
            with _held_lock:
                _held.add((self, key))
        except ClientError as e:
            if e.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            old = e.response.get("Item") or self._get(key) or {}
            if old.get("status", {}).get("S") == COMPLETED:
                raise AlreadyProcessed(key) from None
            raise ClaimedElsewhere(
                f"event {key} is being processed by another consumer (lease until "
                f"{old.get('lease_until', {}).get('N', '?')})") from None

    def complete(self, key: str) -> None:
        with _held_lock:
            _held.discard((self, key))
        self._ddb.update_item(
            TableName=self.table, Key={"pk": {"S": key}},
            UpdateExpression="SET #s = :done, completed_at = :now, expires_at = :exp "
                             "REMOVE lease_until",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":done": {"S": COMPLETED},
                                       ":now": {"N": f"{time.time():.3f}"},
                                       ":exp": {"N": str(int(time.time() + self.retention_s))}},
        )

    def release(self, key: str) -> None:
        with _held_lock:
            _held.discard((self, key))
        try:
            self._ddb.delete_item(
                TableName=self.table, Key={"pk": {"S": key}},
                ConditionExpression="#s = :in_progress",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={":in_progress": {"S": IN_PROGRESS}})
        except ClientError as e:
            if e.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    def status(self, key: str) -> str | None:
        item = self._get(key)
        return item["status"]["S"] if item else None

    def _get(self, key: str) -> dict[str, Any] | None:
        return self._ddb.get_item(TableName=self.table, Key={"pk": {"S": key}},
                                  ConsistentRead=True).get("Item")

    def once(self, key: str, lease_s: float, work: Callable[[], T]) -> tuple[bool, T | None]:
        """Run ``work`` unless ``key`` was done: (True, result) if it ran, (False, None) if not.

        ``work`` raising releases the claim and re-raises, so the next delivery retries.
        """
        try:
            self.claim(key, lease_s)
        except AlreadyProcessed:
            log.info("skipping %s: already processed", key)
            return False, None
        try:
            result = work()
        except BaseException:
            self.release(key)
            raise
        self.complete(key)
        return True, result
