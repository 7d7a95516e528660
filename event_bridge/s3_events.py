"""S3 object events, whatever carried them: EventBridge, SNS, or a direct S3 notification.

A handler should not care whether "an object was written" arrived as an EventBridge event
(raw or in an SNS envelope) or as an S3 Event Notification (``{"Records": [...]}``, keys
URL-encoded), so every shape is turned into the same ``S3ObjectEvent``. ``s3:TestEvent``
(what S3 sends when notifications are configured) yields no event: it is not work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus


class NotAnS3Event(ValueError):
    """The message is not an S3 object event in any shape clusterflow knows."""


@dataclass(frozen=True)
class S3ObjectEvent:
    bucket: str
    key: str
    size: int | None
    etag: str | None
    sequencer: str | None
    version_id: str | None
    time: str | None
    # "Object Created" / "Object Deleted" (EventBridge detail-type) or "ObjectCreated:Put"...
    kind: str
    event_id: str | None
    replay_name: str | None = None

    @property
    def created(self) -> bool:
        return self.kind.replace(" ", "").startswith("ObjectCreated")

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def identity(self) -> str:
        """What this event is about, the same for every delivery and replay of it.

        S3 gives each write its own sequencer (and each version its id), so bucket + key +
        sequencer names one write; without one (some emulators), the ETag stands in.
        """
        version = self.version_id if self.version_id not in (None, "null") else None
        mark = self.sequencer or version or self.etag or self.time or ""
        return f"s3://{self.bucket}/{self.key}@{mark}"


def unwrap_sns(doc: Any) -> Any:
    """The message inside an SNS envelope (non-raw delivery), else the document itself."""
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:
        try:
            return json.loads(doc["Message"])
        except ValueError:
            return doc["Message"]
    return doc


def _from_eventbridge(doc: dict[str, Any]) -> S3ObjectEvent:
    detail = doc["detail"]
    obj = detail["object"]
    return S3ObjectEvent(
        bucket=str(detail["bucket"]["name"]),
        # URL-decoded as in event_bridge.consumer.parse_event (S3 encodes keys in events).
        key=unquote_plus(str(obj["key"])),
        size=obj.get("size"), etag=obj.get("etag") or obj.get("eTag"),
        sequencer=obj.get("sequencer"), version_id=obj.get("version-id"),
        time=doc.get("time"), kind=str(doc.get("detail-type", "")),
        event_id=doc.get("id"), replay_name=doc.get("replay-name"),
    )


def _from_notification(record: dict[str, Any]) -> S3ObjectEvent:
    s3 = record["s3"]
    obj = s3["object"]
    return S3ObjectEvent(
        bucket=str(s3["bucket"]["name"]),
        # S3 Event Notifications URL-encode keys (spaces as '+', '/' as %2F on some endpoints).
        key=unquote_plus(str(obj["key"])),
        size=obj.get("size"), etag=obj.get("eTag"), sequencer=obj.get("sequencer"),
        version_id=obj.get("versionId"), time=record.get("eventTime"),
        kind=str(record.get("eventName", "")), event_id=None,
    )


def parse_s3_events(body: str | dict[str, Any]) -> list[S3ObjectEvent]:
    """Every S3 object event in an SQS message body or SNS message ([] for s3:TestEvent)."""
    try:
        doc = json.loads(body) if isinstance(body, str) else body
        doc = unwrap_sns(doc)
        if isinstance(doc, dict) and doc.get("Event") == "s3:TestEvent":
            return []
        if isinstance(doc, dict) and doc.get("source") == "aws.s3" and "detail" in doc:
            return [_from_eventbridge(doc)]
        if isinstance(doc, dict) and isinstance(doc.get("Records"), list):
            records = [r for r in doc["Records"] if r.get("eventSource") == "aws:s3"]
            if records and len(records) == len(doc["Records"]):
                return [_from_notification(r) for r in records]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise NotAnS3Event(f"not an S3 object event: {type(e).__name__}: {e}") from None
    raise NotAnS3Event("not an S3 object event: neither an EventBridge 'aws.s3' event nor an "
                       "S3 Event Notification")
