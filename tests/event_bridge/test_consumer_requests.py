"""What a batched consumer sends to SQS: one receive and one delete per batch, retries kept.

Behaviour, not timing: the request counts are what batching saves on AWS whatever the
endpoint's speed (``bench/fanout.py`` measures the speed).
"""

from __future__ import annotations

import threading
from typing import Any

from event_bridge.apply import apply_fabric
from event_bridge.fabric import Fabric, QueueSpec
from event_bridge.runtime import Backoff, SqsEventSource
from tests.events_support import tag


class _Requests:
    """SQS requests by operation, with their entry counts, from botocore's own events."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        client.meta.events.register("provide-client-params.sqs", self._record)

    def _record(self, params: dict[str, Any], model: Any = None, **_: Any) -> None:
        with self._lock:
            self.calls.append((model.name, len(params.get("Entries", []))))

    def close(self) -> None:
        self.client.meta.events.unregister("provide-client-params.sqs", self._record)


def test_a_batch_is_deleted_in_one_request_and_its_failed_record_comes_back(aws):
    t = tag()
    q = apply_fabric(aws, Fabric(queues=[QueueSpec(name=f"batch-{t}", max_receive_count=5)],
                                 dedup=None)).queues[f"batch-{t}"]
    sqs = aws.client("sqs")
    sqs.send_message_batch(QueueUrl=q.url, Entries=[
        {"Id": str(i), "MessageBody": f"m{i}"} for i in range(10)])
    seen: list[list[str]] = []

    def handler(event, context):
        seen.append(sorted(r["body"] for r in event["Records"]))
        return {"batchItemFailures": [{"itemIdentifier": r["messageId"]}
                                      for r in event["Records"] if r["body"] == "m3"]}

    source = SqsEventSource(aws, q.url, handler, name="batched", batch_size=10,
                            backoff=Backoff(base_s=0), heartbeat_s=0)
    requests = _Requests(source.sqs)
    try:
        got = 0
        while got < 10:  # SQS may hand out fewer than asked; a standard queue has no order
            got += source.poll_once(wait_time_s=1)
        calls = list(requests.calls)
    finally:
        requests.close()
    receives = [c for c in calls if c[0] == "ReceiveMessage"]
    deletes = [n for op, n in calls if op == "DeleteMessageBatch"]
    assert "DeleteMessage" not in {op for op, _ in calls}  # never one request per message
    assert sum(deletes) == 9 and len(deletes) == len(receives)  # one delete per batch
    assert source.stats.processed == 9 and source.stats.failed == 1
    # The failed record alone comes back (its backoff was 0), and is then deleted.
    source.handler = lambda event, context: seen.append([r["body"] for r in event["Records"]])
    assert source.poll_once(wait_time_s=1) == 1
    assert seen[-1] == ["m3"]
    assert source.stats.processed == 10
