"""Lambda-style consumers: partial batches, poison messages, DLQs, FIFO order, idempotency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from event_bridge.apply import apply_fabric
from event_bridge.batch import sqs_batch_handler
from event_bridge.fabric import (
    BucketSpec,
    ConsumerSpec,
    DedupSpec,
    Fabric,
    QueueSpec,
    RuleSpec,
    SubscriptionSpec,
    TargetSpec,
    TopicSpec,
)
from event_bridge.run_events import parse_run_event, publish_run_event
from event_bridge.runtime import Backoff, SqsEventSource
from event_bridge.service import drain
from event_bridge.topology import FanOutTopology
from infra.staging.objects import sha256_file, upload
from tests.events_support import COUNTS_ENV, counts, event_body, make_counter_table, tag

REPO = Path(__file__).resolve().parents[2]
FAST = Backoff(base_s=0)


def _queue_fabric(t: str, handler: str, **queue: object) -> Fabric:
    return Fabric(queues=[QueueSpec(name=f"q-{t}", **queue)],
                  consumers=[ConsumerSpec(queue=f"q-{t}", handler=handler)],
                  dedup=DedupSpec(table=f"dedup-{t}"))


def _depth(aws, url: str) -> int:
    a = aws.client("sqs").get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(a["ApproximateNumberOfMessages"]) + int(a["ApproximateNumberOfMessagesNotVisible"])


def _all(aws, url: str) -> list[dict]:
    sqs, got = aws.client("sqs"), []
    while True:
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                   MessageSystemAttributeNames=["All"]).get("Messages", [])
        if not msgs:
            return got
        got += msgs


def test_poison_messages_reach_the_dlq_while_good_ones_flow(aws, tmp_path):
    """Production settings (visibility 300 s, maxReceiveCount 3); drain's backoff does the rest."""
    t = tag()
    bucket = f"res-{t}"
    topo = FanOutTopology(results_bucket=bucket, key_prefix="runs/", key_suffix="manifest.json",
                          topic=f"results-{t}", queues=(f"pp-{t}",))
    fabric = Fabric(
        buckets=[BucketSpec(name=bucket)], queues=[QueueSpec(name=f"pp-{t}")],
        topics=[TopicSpec(name=f"results-{t}", subscriptions=[SubscriptionSpec(queue=f"pp-{t}")])],
        rules=[RuleSpec(name=topo.rule_name, pattern=topo.event_pattern(),
                        targets=[TargetSpec(topic=f"results-{t}")])],
        consumers=[ConsumerSpec(queue=f"pp-{t}", handler="event_bridge.handlers:verify_results")],
        dedup=DedupSpec(table=f"dedup-{t}"))
    applied = apply_fabric(aws, fabric)
    queue = applied.queues[f"pp-{t}"]
    assert (queue.visibility_timeout, queue.max_receive_count) == (300, 3)

    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 1000)
    for run in ("r1", "r2", "r3"):  # real results: S3 -> EventBridge -> SNS -> SQS
        upload(aws, data, bucket, f"runs/{run}/data.bin")
        manifest = tmp_path / "manifest.json"
        manifest.write_text(json.dumps({"files": [{"name": "data.bin",
                                                   "sha256": sha256_file(data)}]}))
        upload(aws, manifest, bucket, f"runs/{run}/manifest.json")
    poison = {
        "{not json",
        json.dumps({"id": "w1", "source": "aws.s3", "detail-type": "Object Created",
                    "detail": {"bucket": {}}}),                       # wrong schema
        json.dumps({"padding": "x" * 250_000}),                       # 250 KB body
    }
    for body in poison:
        aws.client("sqs").send_message(QueueUrl=queue.url, MessageBody=body)

    summary = drain(aws, fabric, backoff=FAST, timeout_s=60)
    stats = summary["queues"][f"pp-{t}"]
    assert summary["ok"], summary
    assert stats["processed"] == 3
    assert stats["sent_to_dlq"] == 3 and stats["failed"] == 9  # 3 receives each, then the DLQ
    assert stats["dlq_depth"] == 3
    assert _depth(aws, queue.url) == 0
    dead = _all(aws, queue.dlq_url)
    assert {m["Body"] for m in dead} == poison
    assert all(int(m["Attributes"]["ApproximateReceiveCount"]) >= 3 for m in dead)


def test_partial_batch_response_retries_only_the_failed_messages(aws):
    t = tag()
    applied = apply_fabric(aws, _queue_fabric(t, "tests.events_support:always_fail",
                                              max_receive_count=5))
    q = applied.queues[f"q-{t}"]
    sqs = aws.client("sqs")
    for i in range(3):
        sqs.send_message(QueueUrl=q.url, MessageBody=f"m{i}")
    seen: list[list[str]] = []

    def handler(event, context):
        bodies = [r["body"] for r in event["Records"]]
        seen.append(bodies)
        assert all(r["eventSource"] == "aws:sqs" and r["eventSourceARN"] == q.arn
                   for r in event["Records"])
        assert context.get_remaining_time_in_millis() > 0
        return {"batchItemFailures": [{"itemIdentifier": r["messageId"]}
                                      for r in event["Records"] if r["body"] == "m1"]}

    source = SqsEventSource(aws, q.url, handler, name="partial", backoff=FAST)
    source.poll_once(wait_time_s=1)
    assert sorted(seen[0]) == ["m0", "m1", "m2"]
    source.poll_once(wait_time_s=1)
    assert seen[1] == ["m1"]  # only the reported failure came back

    # An identifier that is not in the batch, or an exception, fails the whole batch.
    sqs.send_message(QueueUrl=q.url, MessageBody="m3")

    def bogus(event, context):
        return {"batchItemFailures": [{"itemIdentifier": "not-in-this-batch"}]}

    def boom(event, context):
        raise RuntimeError("whole batch")

    for bad in (bogus, boom):
        retried = SqsEventSource(aws, q.url, bad, name="bad", backoff=FAST)
        assert retried.poll_once(wait_time_s=1) >= 1
        assert retried.stats.handler_errors == 1 and retried.stats.processed == 0
    assert _depth(aws, q.url) == 2  # m1 and m3 are still there, nothing was lost


def test_visibility_is_extended_while_the_handler_works(aws):
    t = tag()
    q = apply_fabric(aws, _queue_fabric(t, "tests.events_support:always_fail",
                                        visibility_timeout=4)).queues[f"q-{t}"]
    sqs = aws.client("sqs")
    sqs.send_message(QueueUrl=q.url, MessageBody="slow")
    stolen: list[str] = []
    done = threading.Event()

    def thief() -> None:  # a second consumer polling all along, long past the 4 s timeout
        while not done.wait(0.2):
            stolen.extend(m["Body"] for m in sqs.receive_message(
                QueueUrl=q.url, WaitTimeSeconds=0).get("Messages", []))

    spy = threading.Thread(target=thief)

    def slow(event, context):
        spy.start()  # from inside the handler: the message has been received by then
        time.sleep(9)
        return None

    source = SqsEventSource(aws, q.url, slow, name="slow", backoff=FAST)
    try:
        source.poll_once(wait_time_s=1)
    finally:
        done.set()
        if spy.is_alive():
            spy.join()
    assert stolen == []
    assert source.stats.processed == 1 and _depth(aws, q.url) == 0


def test_duplicate_deliveries_are_processed_once(aws, monkeypatch):
    t = tag()
    table = make_counter_table(aws)
    monkeypatch.setenv(COUNTS_ENV, table)
    fabric = _queue_fabric(t, "tests.events_support:count_events")
    q = apply_fabric(aws, fabric).queues[f"q-{t}"]
    sqs = aws.client("sqs")
    for body in (event_body("e1"), event_body("e2"), event_body("e1"), event_body("e1")):
        sqs.send_message(QueueUrl=q.url, MessageBody=body)
    summary = drain(aws, fabric, backoff=FAST, timeout_s=30)
    assert summary["queues"][f"q-{t}"]["processed"] == 4  # all acknowledged ...
    assert counts(aws, table) == {"e1": 1, "e2": 1}        # ... each event done once
    sqs.send_message(QueueUrl=q.url, MessageBody=event_body("e2"))  # and later, again
    drain(aws, fabric, backoff=FAST, timeout_s=30)
    assert counts(aws, table) == {"e1": 1, "e2": 1}


def test_consumer_killed_mid_batch_redelivers_without_double_processing(aws, tmp_path,
                                                                         monkeypatch):
    t = tag()
    table = make_counter_table(aws)
    fabric = _queue_fabric(t, "tests.events_support:count_events", visibility_timeout=2,
                           max_receive_count=5)
    q = apply_fabric(aws, fabric).queues[f"q-{t}"]
    for i in range(1, 6):
        aws.client("sqs").send_message(QueueUrl=q.url, MessageBody=event_body(f"e{i}"))
    path = tmp_path / "fabric.yaml"
    path.write_text(yaml.safe_dump(fabric.model_dump(mode="json", exclude_none=True)))
    marker = tmp_path / "hanging"
    env = {**os.environ, "AWS_ENDPOINT_URL": aws.endpoint_url, COUNTS_ENV: table,
           "CLUSTERFLOW_TEST_HANG_ON": "e3", "CLUSTERFLOW_TEST_MARKER": str(marker),
           "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "event_bridge.cli", "consume", "--fabric", str(path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the consumer never reached e3"
            time.sleep(0.05)
        done_before = counts(aws, table)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-batch: e3 in the handler, nothing deleted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert set(done_before) == {"e1", "e2"}
    assert _depth(aws, q.url) == 5  # the whole batch is still owed

    monkeypatch.setenv(COUNTS_ENV, table)
    summary = drain(aws, fabric, backoff=FAST, timeout_s=60)
    assert summary["queues"][f"q-{t}"]["processed"] == 5
    assert counts(aws, table) == {f"e{i}": 1 for i in range(1, 6)}
    assert _depth(aws, q.url) == 0


def test_fifo_failure_blocks_only_its_group_until_the_dlq(aws):
    t = tag()
    fabric = Fabric(
        queues=[QueueSpec(name=f"runs-{t}.fifo")],
        topics=[TopicSpec(name=f"runs-{t}.fifo",
                          subscriptions=[SubscriptionSpec(queue=f"runs-{t}.fifo")])],
        dedup=DedupSpec(table=f"dedup-{t}"))
    applied = apply_fabric(aws, fabric)
    topic, q = applied.topics[f"runs-{t}.fifo"], applied.queues[f"runs-{t}.fifo"]
    for run, stage in [("A", "s1"), ("A", "s2"), ("B", "s1"), ("A", "s3"), ("B", "s2"),
                       ("A", "s4"), ("B", "s3"), ("A", "s1")]:  # the last one: deduplicated
        publish_run_event(aws, topic, run, stage)
    timeline: list[tuple[str, str, str]] = []

    def process(record, context):
        detail = parse_run_event(record["body"])["detail"]
        if (detail["run_id"], detail["stage"]) == ("A", "s2"):
            timeline.append(("fail", "A", "s2"))
            raise RuntimeError("stage s2 of run A cannot be handled")
        timeline.append(("ok", detail["run_id"], detail["stage"]))

    source = SqsEventSource(aws, q.url, sqs_batch_handler(process), name=f"runs-{t}",
                            # A's retries wait 2 s then 4 s: B's three messages must get
                            # through in that time, which a loaded machine still allows.
                            backoff=Backoff(base_s=2), dedup_table=f"dedup-{t}")
    stats = source.drain(timeout_s=60)
    ok = [(r, s) for kind, r, s in timeline if kind == "ok"]
    assert [s for r, s in ok if r == "A"] == ["s1", "s3", "s4"]  # order kept, s2 skipped
    assert [s for r, s in ok if r == "B"] == ["s1", "s2", "s3"]
    fails = [i for i, e in enumerate(timeline) if e[0] == "fail"]
    assert len(fails) == 3  # maxReceiveCount, then SQS dead-letters it
    assert timeline.index(("ok", "A", "s3")) > fails[-1]          # A waited for s2's fate
    assert timeline.index(("ok", "B", "s3")) < timeline.index(("ok", "A", "s3"))  # B did not
    assert stats.sent_to_dlq == 1 and stats.processed == 6
    dead = _all(aws, q.dlq_url)
    assert [parse_run_event(m["Body"])["detail"]["stage"] for m in dead] == ["s2"]


def test_fifo_queue_rejects_a_standard_topic():
    with pytest.raises(ValueError, match="cannot deliver to FIFO queue"):
        Fabric(queues=[QueueSpec(name="x.fifo")],
               topics=[TopicSpec(name="std", subscriptions=[SubscriptionSpec(queue="x.fifo")])])


def test_batch_handler_stops_a_fifo_group_at_its_first_failure():
    calls: list[str] = []

    def process(record, context):
        calls.append(record["body"])
        if record["body"] == "a2":
            raise ValueError("a2 is bad")

    records = [{"messageId": body, "body": body, "attributes": {"MessageGroupId": body[0]}}
               for body in ("a1", "b1", "a2", "b2", "a3")]
    response = sqs_batch_handler(process, idempotent=False)({"Records": records}, None)
    assert calls == ["a1", "b1", "a2", "b2"]  # a3 is not run: it would overtake a2
    assert [f["itemIdentifier"] for f in response["batchItemFailures"]] == ["a2", "a3"]
    # The runtime enforces the same for any handler, whatever it reports.
    messages = [{"MessageId": r["messageId"], "Attributes": r["attributes"]} for r in records]
    assert SqsEventSource._hold_groups(messages, {"a2"}) == {"a2", "a3"}
