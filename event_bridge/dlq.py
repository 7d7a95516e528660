"""Inspect a queue's DLQ and move its messages back, without losing one.

Redrive uses SQS's own StartMessageMoveTask. Only when the endpoint is not AWS and answers
that the call is not implemented (moto 5.2.5 does: HTTP 500) does it fall back to moving
messages itself, in the one order that cannot lose a message: send a copy to the source
queue, and delete the DLQ message only once that send succeeded. A crash in between leaves a
duplicate, never a gap; the consumers' dedup store absorbs the duplicate. On AWS every error,
including an unsupported call, is raised as it is.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from botocore.exceptions import ClientError

from event_bridge.runtime import QueueInfo
from infra.aws.clients import AwsTarget

UNIMPLEMENTED_CODES = {"500", "501", "NotImplemented", "NotImplementedError", "InternalFailure",
                       "InternalError"}


class NoDeadLetterQueue(LookupError):
    """The queue has no RedrivePolicy, so it has no DLQ to inspect or redrive."""


class RedriveUnsupported(ValueError):
    """The method asked for is one the endpoint does not implement; nothing was moved."""


@dataclass
class RedriveResult:
    queue: str
    dlq: str
    method: str
    moved: int
    task_handle: str | None = None
    status: str = "COMPLETED"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def endpoint_lacks_call(aws: AwsTarget, error: ClientError) -> bool:
    """True only for a non-AWS endpoint saying it does not implement the call."""
    if aws.endpoint_url is None:
        return False
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    err = error.response.get("Error", {})
    message = str(err.get("Message", "")).lower()
    return status in (500, 501) and (
        str(err.get("Code")) in UNIMPLEMENTED_CODES or "not implemented" in message
        or "not yet implemented" in message)


def _queue(aws: AwsTarget, name: str) -> tuple[QueueInfo, str]:
    sqs = aws.client("sqs")
    try:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as e:
        raise LookupError(f"queue {name} does not exist here ({aws.label})") from e
    info = QueueInfo.read(sqs, url)
    if info.dlq_url is None:
        raise NoDeadLetterQueue(f"queue {name} has no dead-letter queue (no RedrivePolicy)")
    return info, url


def _dlq_arn(aws: AwsTarget, dlq_url: str) -> str:
    return aws.client("sqs").get_queue_attributes(
        QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def _depth(aws: AwsTarget, url: str) -> dict[str, int]:
    attrs = aws.client("sqs").get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return {"visible": int(attrs["ApproximateNumberOfMessages"]),
            "in_flight": int(attrs["ApproximateNumberOfMessagesNotVisible"])}


def list_dlq(aws: AwsTarget, queue: str, limit: int = 50, preview: int = 200) -> dict[str, Any]:
    """The DLQ's depth and a peek at up to ``limit`` messages (made visible again at once)."""
    info, _ = _queue(aws, queue)
    sqs = aws.client("sqs")
    assert info.dlq_url is not None
    seen: dict[str, dict[str, Any]] = {}
    handles = []
    while len(seen) < limit:
        msgs = sqs.receive_message(
            QueueUrl=info.dlq_url, MaxNumberOfMessages=min(10, limit - len(seen)),
            VisibilityTimeout=30, WaitTimeSeconds=0, MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"]).get("Messages", [])
        fresh = [m for m in msgs if m["MessageId"] not in seen]
        if not fresh:
            break
        for m in fresh:
            a = m.get("Attributes", {})
            body = m["Body"]
            seen[m["MessageId"]] = {
                "message_id": m["MessageId"],
                "sent": int(a.get("SentTimestamp", 0)) / 1000,
                "receive_count": int(a.get("ApproximateReceiveCount", 0)),
                "group": a.get("MessageGroupId"),
                "bytes": len(body.encode()),
                "body": body if len(body) <= preview else body[:preview] + "...",
            }
            handles.append(m["ReceiptHandle"])
    for i in range(0, len(handles), 10):  # peeked, not taken: visible again now
        sqs.change_message_visibility_batch(QueueUrl=info.dlq_url, Entries=[
            {"Id": str(j), "ReceiptHandle": h, "VisibilityTimeout": 0}
            for j, h in enumerate(handles[i:i + 10])])
    return {"queue": queue, "dlq": info.dlq_url.rsplit("/", 1)[-1],
            "depth": _depth(aws, info.dlq_url), "messages": list(seen.values())}


def redrive(aws: AwsTarget, queue: str, method: str = "auto", wait_s: float = 300.0,
            ) -> RedriveResult:
    """Move every message of ``queue``'s DLQ back to ``queue``.

    ``method``: ``auto`` (StartMessageMoveTask, falling back only where the endpoint lacks it),
    ``move-task`` (never fall back) or ``copy`` (send-then-delete, e.g. for a FIFO DLQ).
    """
    info, _ = _queue(aws, queue)
    assert info.dlq_url is not None
    dlq_name = info.dlq_url.rsplit("/", 1)[-1]
    if method in ("auto", "move-task"):
        sqs = aws.client("sqs")
        dlq_arn = _dlq_arn(aws, info.dlq_url)
        try:
            handle = sqs.start_message_move_task(SourceArn=dlq_arn,
                                                 DestinationArn=info.arn)["TaskHandle"]
        except ClientError as e:
            if not endpoint_lacks_call(aws, e):
                raise
            if method == "move-task":
                raise RedriveUnsupported(
                    f"{aws.label} does not implement StartMessageMoveTask; nothing was moved. "
                    "Use --method copy (or auto, which falls back to copy there)") from None
        else:
            return _wait_for_task(aws, queue, dlq_name, dlq_arn, handle, wait_s)
    elif method != "copy":
        raise ValueError(f"unknown redrive method {method!r}: auto, move-task or copy")
    moved = _copy_back(aws, info, info.dlq_url, wait_s)
    return RedriveResult(queue=queue, dlq=dlq_name, method="copy", moved=moved)


def _wait_for_task(aws: AwsTarget, queue: str, dlq_name: str, dlq_arn: str, handle: str,
                   wait_s: float) -> RedriveResult:
    sqs = aws.client("sqs")
    deadline = time.monotonic() + wait_s
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        tasks = sqs.list_message_move_tasks(SourceArn=dlq_arn, MaxResults=10)["Results"]
        task = next((t for t in tasks if t.get("TaskHandle") == handle), tasks[0] if tasks
                    else {})
        if task.get("Status") in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(2)
    if task.get("Status") == "FAILED":
        raise RuntimeError(f"moving {dlq_name} back to {queue} failed: "
                           f"{task.get('FailureReason', 'no reason given')}")
    return RedriveResult(queue=queue, dlq=dlq_name, method="StartMessageMoveTask",
                         moved=int(task.get("ApproximateNumberOfMessagesMoved", 0)),
                         task_handle=handle, status=task.get("Status", "RUNNING"))


def _attributes_for_send(attrs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, a in attrs.items():
        kept = {k: a[k] for k in ("DataType", "StringValue", "BinaryValue") if k in a}
        out[name] = kept
    return out


def _copy_back(aws: AwsTarget, source: QueueInfo, dlq_url: str, wait_s: float) -> int:
    sqs = aws.client("sqs")
    moved = 0
    deadline = time.monotonic() + wait_s
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"moved {moved} message(s) back in {wait_s:.0f} s but the DLQ "
                               f"still holds {_depth(aws, dlq_url)}; run redrive again")
        msgs = sqs.receive_message(
            QueueUrl=dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=60, WaitTimeSeconds=0,
            MessageSystemAttributeNames=["All"], MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not msgs:
            if _depth(aws, dlq_url)["visible"] == 0:
                return moved
            time.sleep(0.2)
            continue
        entries = []
        for i, m in enumerate(msgs):
            entry: dict[str, Any] = {"Id": str(i), "MessageBody": m["Body"]}
            if m.get("MessageAttributes"):
                entry["MessageAttributes"] = _attributes_for_send(m["MessageAttributes"])
            if source.fifo:
                # A fresh deduplication id: the original one may still be inside the source
                # queue's 5-minute window, and SQS would silently drop the copy.
                entry["MessageGroupId"] = m["Attributes"].get("MessageGroupId", "redrive")
                entry["MessageDeduplicationId"] = f"redrive-{m['MessageId']}"
            entries.append(entry)
        resp = sqs.send_message_batch(QueueUrl=source.url, Entries=entries)
        sent = {e["Id"] for e in resp.get("Successful", [])}
        if resp.get("Failed"):
            raise RuntimeError(
                f"could not send {len(resp['Failed'])} message(s) back to "
                f"{source.url.rsplit('/', 1)[-1]}: {json.dumps(resp['Failed'])[:500]}; they "
                "stay in the DLQ")
        done = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(msgs) if str(i) in sent]
        if done:
            sqs.delete_message_batch(QueueUrl=dlq_url, Entries=done)
        moved += len(done)
