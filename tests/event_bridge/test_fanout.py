"""Topology apply, S3 -> EventBridge -> SNS -> SQS filtering, and the manifest consumer."""

from __future__ import annotations

import json
import uuid

import pytest

from event_bridge.consumer import ManifestMismatch, PoisonMessage, consume_until, parse_event
from event_bridge.topology import FanOutTopology, apply_topology
from flows.pipeline import ensure_bucket
from infra.staging.objects import sha256_file, upload


@pytest.fixture
def topo(aws):
    tag = uuid.uuid4().hex[:8]
    t = FanOutTopology(results_bucket=f"fan-{tag}", key_prefix="runs/",
                       key_suffix="manifest.json", topic=f"topic-{tag}",
                       queues=(f"a-{tag}", f"b-{tag}"), max_receive_count=2,
                       visibility_timeout=0)
    ensure_bucket(aws, t.results_bucket)
    return t


def _depth(aws, url: str) -> int:
    attrs = aws.client("sqs").get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"])


def _publish_run(aws, tmp_path, bucket: str, run: str, tamper: bool = False) -> str:
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 1000)
    digest = sha256_file(data)
    upload(aws, data, bucket, f"runs/{run}/data.bin")
    if tamper:
        aws.client("s3").put_object(Bucket=bucket, Key=f"runs/{run}/data.bin", Body=b"evil")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"files": [{"name": "data.bin", "sha256": digest}]}))
    upload(aws, manifest, bucket, f"runs/{run}/manifest.json")
    return f"runs/{run}/manifest.json"


def test_apply_is_idempotent(aws, topo):
    first = apply_topology(aws, topo)
    second = apply_topology(aws, topo)
    assert first == second
    subs = aws.client("sns").list_subscriptions_by_topic(TopicArn=first.topic_arn)
    assert len(subs["Subscriptions"]) == 2
    rules = aws.client("events").list_rules(NamePrefix=topo.rule_name)["Rules"]
    assert len(rules) == 1
    policy = json.loads(aws.client("sqs").get_queue_attributes(
        QueueUrl=first.queue_urls[topo.queues[0]], AttributeNames=["Policy"])["Attributes"][
        "Policy"])
    assert policy["Statement"][0]["Condition"]["ArnEquals"]["aws:SourceArn"] == first.topic_arn


def test_only_result_manifests_fan_out(aws, topo, tmp_path):
    applied = apply_topology(aws, topo)
    s3 = aws.client("s3")
    s3.put_object(Bucket=topo.results_bucket, Key="runs/r0/field.npy", Body=b"1")
    s3.put_object(Bucket=topo.results_bucket, Key="inputs/manifest.json", Body=b"{}")
    s3.put_object(Bucket=topo.results_bucket, Key="runs/r0/manifest.json.bak", Body=b"{}")
    for url in applied.queue_urls.values():
        assert _depth(aws, url) == 0
    key = _publish_run(aws, tmp_path, topo.results_bucket, "r1")
    for q, url in applied.queue_urls.items():
        assert _depth(aws, url) == 1  # one 'Object Created'; 'Object Tags Added' filtered out
        report = consume_until(aws, q, url, want_key=key, timeout_s=10)
        assert (report.received, report.verified, report.keys) == (1, 1, [key])
        assert _depth(aws, url) == 0


def test_tampered_result_is_refused_and_left_for_the_dlq(aws, topo, tmp_path):
    applied = apply_topology(aws, topo)
    key = _publish_run(aws, tmp_path, topo.results_bucket, "bad", tamper=True)
    q = topo.queues[0]
    with pytest.raises(ManifestMismatch, match="runs/bad/data.bin"):
        consume_until(aws, q, applied.queue_urls[q], want_key=key, timeout_s=10)
    sqs = aws.client("sqs")
    # Not acknowledged: after maxReceiveCount (2) receives SQS moves it to the DLQ.
    sqs.receive_message(QueueUrl=applied.queue_urls[q], WaitTimeSeconds=1)
    assert sqs.receive_message(QueueUrl=applied.queue_urls[q]).get("Messages") is None
    (dead,) = sqs.receive_message(QueueUrl=applied.dlq_urls[q],
                                  WaitTimeSeconds=1)["Messages"]
    assert parse_event(dead["Body"]).key == key


def test_poison_message_is_skipped_not_acknowledged(aws, topo, tmp_path):
    applied = apply_topology(aws, topo)
    q = topo.queues[1]
    url = applied.queue_urls[q]
    aws.client("sqs").send_message(QueueUrl=url, MessageBody="{not json")
    key = _publish_run(aws, tmp_path, topo.results_bucket, "good")
    report = consume_until(aws, q, url, want_key=key, timeout_s=15)
    assert report.verified == 1 and report.keys == [key]
    assert len(report.failed) >= 1 and "not an S3 Object Created event" in report.failed[0]


def test_parse_event_decodes_keys_and_sns_envelopes():
    event = {"id": "e1", "source": "aws.s3", "detail": {"bucket": {"name": "b"},
                                    "object": {"key": "runs/a+b%2Fc/manifest.json"}}}
    assert parse_event(json.dumps(event)).key == "runs/a b/c/manifest.json"
    envelope = {"Type": "Notification", "Message": json.dumps(event)}
    assert parse_event(json.dumps(envelope)).bucket == "b"
    with pytest.raises(PoisonMessage):
        parse_event(json.dumps({"id": "x"}))
