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
    """A client's requests by operation, with their entry counts (botocore's own events)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        client.meta.events.register("provide-client-params", self._record)

    def _record(self, params: dict[str, Any], model: Any = None, **_: Any) -> None:
        with self._lock:
            self.calls.append((model.name, len(params.get("Entries", []))))

    def close(self) -> None:
        self.client.meta.events.unregister("provide-client-params", self._record)


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


def test_an_idempotent_batch_completes_its_claims_in_one_write_and_retries_a_failure(aws):
    from event_bridge.batch import sqs_batch_handler
    from event_bridge.idempotency import COMPLETED, DedupStore
    from event_bridge.lambda_shapes import new_context
    from tests.events_support import event_body

    t = tag()
    table = f"dedup-{t}"
    store = DedupStore(aws, table)  # creates the table
    ran: list[str] = []

    def process(record, context):
        ran.append(record["messageId"])
        if record["messageId"] == "m3":
            raise RuntimeError("m3 fails")

    handler = sqs_batch_handler(process)
    records = [{"messageId": f"m{i}", "body": event_body(f"e{i % 8}"), "attributes": {}}
               for i in range(10)]  # m8 and m9 repeat the events of m0 and m1
    ddb = aws.client("dynamodb")
    requests = _Requests(ddb)
    try:
        context = new_context(f"fn-{t}", aws.region, 30.0, aws, table)
        response = handler({"Records": records}, context)
        ops = [op for op, _ in requests.calls]
    finally:
        requests.close()
    assert response == {"batchItemFailures": [{"itemIdentifier": "m3"}]}
    assert sorted(ran) == sorted(f"m{i}" for i in range(8))  # the repeats did not run again
    # 8 claims, one write that completes the 7 that succeeded, one release of the failure.
    assert ops.count("PutItem") == 8 and ops.count("BatchWriteItem") == 1
    assert "UpdateItem" not in ops and ops.count("DeleteItem") == 1
    assert all(store.status(f"fn-{t}#event:e{i}") == COMPLETED for i in range(8) if i != 3)
    assert store.status(f"fn-{t}#event:e3") is None  # released: the retry may claim it

    ran.clear()  # the redelivered batch: only the failed event runs again
    again = handler({"Records": records}, new_context(f"fn-{t}", aws.region, 30.0, aws,
                                                         table))
    assert ran == ["m3"] and again == {"batchItemFailures": [{"itemIdentifier": "m3"}]}
