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
