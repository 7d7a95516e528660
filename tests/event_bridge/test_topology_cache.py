"""An unchanged fan-out topology is checked, not re-applied; a broken one is applied again."""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from typing import Any

import pytest

from event_bridge.topology import FanOutTopology
from event_bridge.topology_cache import ensure_topology
from flows.pipeline import ensure_bucket
from infra.staging.objects import upload

SERVICES = ("sqs", "sns", "events", "s3")


class _Requests:
    """Operation names the clients sent, from botocore's own events."""

    def __init__(self, aws: Any) -> None:
        self.clients = [aws.client(s) for s in SERVICES]
        self.ops: list[str] = []
        self._lock = threading.Lock()
        for client in self.clients:
            client.meta.events.register("before-send", self._record)

    def _record(self, event_name: str = "", **_: Any) -> None:
        with self._lock:
            self.ops.append(event_name.rsplit(".", 1)[-1])

    def close(self) -> None:
        for client in self.clients:
            client.meta.events.unregister("before-send", self._record)


@pytest.fixture
def topo(aws):
    tag = uuid.uuid4().hex[:8]
    t = FanOutTopology(results_bucket=f"cache-{tag}", key_prefix="runs/",
                       key_suffix="manifest.json", topic=f"topic-{tag}",
                       queues=(f"a-{tag}", f"b-{tag}"), max_receive_count=2,
                       visibility_timeout=0)
    ensure_bucket(aws, t.results_bucket)
    return t


def test_an_unchanged_topology_is_only_read_not_applied_again(aws, topo, tmp_path):
    first, applied = ensure_topology(aws, topo, tmp_path)
    assert applied
    requests = _Requests(aws)
    try:
        second, applied_again = ensure_topology(aws, topo, tmp_path)
    finally:
        requests.close()
    assert not applied_again and second == first
    writes = [op for op in requests.ops if not op.startswith(("Get", "List", "Head"))]
    assert writes == [] and len(requests.ops) <= 2 * len(topo.queues) + 3

    # A changed spec is a different fingerprint: applied, whatever the record says.
    wider = dataclasses.replace(topo, visibility_timeout=5)
    _, applied = ensure_topology(aws, wider, tmp_path)
    assert applied
    attrs = aws.client("sqs").get_queue_attributes(
        QueueUrl=first.queue_urls[topo.queues[0]], AttributeNames=["VisibilityTimeout"])
    assert attrs["Attributes"]["VisibilityTimeout"] == "5"


@pytest.mark.parametrize("broken", ["queue", "dlq", "subscription", "rule_target"])
def test_a_deleted_piece_is_re_created_and_fan_out_works_again(aws, topo, tmp_path, broken):
    first, _ = ensure_topology(aws, topo, tmp_path)
    sqs, sns, events = aws.client("sqs"), aws.client("sns"), aws.client("events")
    queue = topo.queues[1]
    if broken == "queue":
        sqs.delete_queue(QueueUrl=first.queue_urls[queue])
    elif broken == "dlq":
        sqs.delete_queue(QueueUrl=first.dlq_urls[queue])
    elif broken == "subscription":
        sub = next(s for s in sns.list_subscriptions_by_topic(
            TopicArn=first.topic_arn)["Subscriptions"] if s["Endpoint"].endswith(queue))
        sns.unsubscribe(SubscriptionArn=sub["SubscriptionArn"])
    else:
        events.remove_targets(Rule=topo.rule_name, Ids=["fanout-topic"])

    again, applied = ensure_topology(aws, topo, tmp_path)
    assert applied  # the check saw the gap and the full apply closed it
    assert ensure_topology(aws, topo, tmp_path)[1] is False  # and recorded the repair
    # The repaired topology delivers a manifest event to both queues.
    data = tmp_path / "manifest.json"
    data.write_text(json.dumps({"files": []}))
    upload(aws, data, topo.results_bucket, "runs/r1/manifest.json")
    for q in topo.queues:
        msgs = sqs.receive_message(QueueUrl=again.queue_urls[q], MaxNumberOfMessages=10,
                                   WaitTimeSeconds=2).get("Messages", [])
        assert any("runs/r1/manifest.json" in m["Body"] for m in msgs), q


def test_a_record_from_another_endpoint_is_not_trusted(aws, topo, tmp_path):
    ensure_topology(aws, topo, tmp_path)
    other = dataclasses.replace(aws, region="eu-west-1")
    _, applied = ensure_topology(other, topo, tmp_path)
    assert applied  # a different endpoint or region: a different fingerprint
