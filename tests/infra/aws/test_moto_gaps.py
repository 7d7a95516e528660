"""The embedded endpoint's EventBridge -> SNS delivery, spoken to through plain boto3."""

from __future__ import annotations

import json
import uuid


def _queue_subscribed_to_topic(aws, topic_arn: str, raw: bool = True) -> str:
    sqs, sns = aws.client("sqs"), aws.client("sns")
    url = sqs.create_queue(QueueName=f"ext-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=arn,
                  Attributes={"RawMessageDelivery": "true" if raw else "false"})
    return url


def _receive(aws, url: str) -> list[str]:
    msgs = aws.client("sqs").receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                             WaitTimeSeconds=1).get("Messages", [])
    return [m["Body"] for m in msgs]


def test_rule_with_sns_target_publishes_event_to_topic(aws):
    events, sns = aws.client("events"), aws.client("sns")
    topic = sns.create_topic(Name=f"ext-{uuid.uuid4().hex[:8]}")["TopicArn"]
    url = _queue_subscribed_to_topic(aws, topic)
    name = f"ext-{uuid.uuid4().hex[:8]}"
    events.put_rule(Name=name, EventPattern=json.dumps(
        {"source": ["test.ext"], "detail": {"size": [{"numeric": [">", 10]}]}}))
    events.put_targets(Rule=name, Targets=[{"Id": "t", "Arn": topic}])

    resp = events.put_events(Entries=[
        {"Source": "test.ext", "DetailType": "x", "Detail": json.dumps({"size": 11})},
        {"Source": "test.ext", "DetailType": "x", "Detail": json.dumps({"size": 3})},
    ])
    assert resp["FailedEntryCount"] == 0
    bodies = [json.loads(b) for b in _receive(aws, url)]
    assert [b["detail"]["size"] for b in bodies] == [11]  # the pattern still filters
    assert bodies[0]["source"] == "test.ext" and isinstance(bodies[0]["time"], str)


def test_sns_and_sqs_targets_on_one_rule_both_deliver(aws):
    events, sns, sqs = aws.client("events"), aws.client("sns"), aws.client("sqs")
    topic = sns.create_topic(Name=f"ext-{uuid.uuid4().hex[:8]}")["TopicArn"]
    via_topic = _queue_subscribed_to_topic(aws, topic, raw=False)
    direct = sqs.create_queue(QueueName=f"ext-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    direct_arn = sqs.get_queue_attributes(QueueUrl=direct, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    name = f"ext-{uuid.uuid4().hex[:8]}"
    events.put_rule(Name=name, EventPattern=json.dumps({"source": ["test.both"]}))
    events.put_targets(Rule=name, Targets=[
        {"Id": "topic", "Arn": topic,
         "InputTransformer": {"InputPathsMap": {"s": "$.source"},
                              "InputTemplate": '{"from": "<s>"}'}},
        {"Id": "queue", "Arn": direct_arn},
    ])
    events.put_events(Entries=[{"Source": "test.both", "DetailType": "x", "Detail": "{}"}])
    (envelope,) = _receive(aws, via_topic)
    assert json.loads(json.loads(envelope)["Message"]) == {"from": "test.both"}
    (raw,) = _receive(aws, direct)
    assert json.loads(raw)["source"] == "test.both"


def test_receive_checks_retention_without_scanning_the_queue_per_message(monkeypatch):
    """The gap fill reads the retention period directly; expired messages are still dropped.

    In process (moto's own mock), so the moto models can be inspected: a 10-message receive
    must not compute the queue-wide approximate counts (3 scans of the queue per message in
    moto 5.2.5), and a message past the queue's retention period is still never returned.
    """
    import boto3
    from moto import mock_aws
    from moto.sqs.models import Queue, sqs_backends

    from infra.aws.moto_gaps import sqs_receive

    sqs_receive.apply()
    scans = []
    original = Queue.approximate_number_of_messages
    monkeypatch.setattr(Queue, "approximate_number_of_messages", property(
        lambda self: scans.append(1) or original.fget(self)))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="retention",
                               Attributes={"MessageRetentionPeriod": "60"})["QueueUrl"]
        for first in (0, 10):
            sqs.send_message_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "MessageBody": f"m{i}"} for i in range(first, first + 10)])
        queue = sqs_backends["123456789012"]["us-east-1"].queues["retention"]
        queue._messages[-1].sent_timestamp -= 61_000  # m19 was sent 61 s ago: past retention
        scans.clear()  # sending computed them; receiving must not
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        assert scans == []
        assert sorted(m["Body"] for m in got) == sorted(f"m{i}" for i in range(10))
        rest = []
        while batch := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get(
                "Messages"):
            rest += [m["Body"] for m in batch]
        assert "m19" not in rest and "m18" in rest
