"""The embedded endpoint's extensions the fabric relies on, spoken to through plain boto3."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from tests.events_support import tag


def _queue(aws, name: str) -> tuple[str, str]:
    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    return url, sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]


def _bodies(aws, url: str) -> list[dict]:
    msgs = aws.client("sqs").receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                             WaitTimeSeconds=1).get("Messages", [])
    return [json.loads(m["Body"]) for m in msgs]


def test_replay_honours_filter_arns_and_keeps_the_whole_event(aws):
    t = tag()
    events, sns = aws.client("events"), aws.client("sns")
    source = f"test.replay.{t}"
    pattern = json.dumps({"source": [source]})
    topic = sns.create_topic(Name=f"rp-{t}")["TopicArn"]
    via_topic, via_topic_arn = _queue(aws, f"rp-topic-{t}")
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=via_topic_arn,
                  Attributes={"RawMessageDelivery": "true"})
    other, other_arn = _queue(aws, f"rp-other-{t}")
    events.put_rule(Name=f"rp-a-{t}", EventPattern=pattern)
    events.put_targets(Rule=f"rp-a-{t}", Targets=[{"Id": "t", "Arn": topic}])
    events.put_rule(Name=f"rp-b-{t}", EventPattern=pattern)
    events.put_targets(Rule=f"rp-b-{t}", Targets=[{"Id": "q", "Arn": other_arn}])
    bus = events.describe_event_bus(Name="default")["Arn"]
    archive = events.create_archive(ArchiveName=f"rp-{t}", EventSourceArn=bus,
                                    EventPattern=pattern)["ArchiveArn"]
    start = datetime.now(timezone.utc) - timedelta(seconds=5)
    events.put_events(Entries=[{"Source": source, "DetailType": "x", "Detail": '{"n": 1}'}])
    live = _bodies(aws, via_topic)
    assert len(live) == 1 and len(_bodies(aws, other)) == 1
    rule_a = events.describe_rule(Name=f"rp-a-{t}")["Arn"]
    events.start_replay(ReplayName=f"rp-{t}", EventSourceArn=archive, EventStartTime=start,
                        EventEndTime=datetime.now(timezone.utc) + timedelta(seconds=5),
                        Destination={"Arn": bus, "FilterArns": [rule_a]})
    (replayed,) = _bodies(aws, via_topic)
    assert replayed["replay-name"] == f"rp-{t}"
    assert replayed["account"] == live[0]["account"] and replayed["detail"] == {"n": 1}
    assert "ingestion-time" not in replayed
    assert _bodies(aws, other) == []  # rule b was not in FilterArns
    # Outside the window: nothing.
    events.start_replay(ReplayName=f"rp-old-{t}", EventSourceArn=archive,
                        EventStartTime=start - timedelta(hours=2),
                        EventEndTime=start - timedelta(hours=1), Destination={"Arn": bus})
    assert _bodies(aws, via_topic) == [] and _bodies(aws, other) == []


def test_setting_one_queue_attribute_keeps_the_policy(aws):
    sqs = aws.client("sqs")
    url, arn = _queue(aws, f"pol-{tag()}")
    policy = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "sns.amazonaws.com"},
        "Action": "sqs:SendMessage", "Resource": arn}]})
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": policy})
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "42"})
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert json.loads(attrs["Policy"]) == json.loads(policy)
    assert attrs["VisibilityTimeout"] == "42"
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": ""})  # explicit removal works
    assert "Policy" not in sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["Policy"]).get("Attributes", {})


def test_bucket_notification_read_back_keeps_eventbridge(aws):
    s3 = aws.client("s3")
    bucket = f"nb-{tag()}"
    s3.create_bucket(Bucket=bucket)
    assert "EventBridgeConfiguration" not in s3.get_bucket_notification_configuration(
        Bucket=bucket)
    s3.put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={"EventBridgeConfiguration": {}})
    assert s3.get_bucket_notification_configuration(Bucket=bucket)[
        "EventBridgeConfiguration"] == {}


def test_a_dead_http_subscriber_does_not_fail_the_publisher(aws):
    from infra.aws.embedded import _free_port

    sns = aws.client("sns")
    topic = sns.create_topic(Name=f"dead-{tag()}")["TopicArn"]
    sns.subscribe(TopicArn=topic, Protocol="http",
                  Endpoint=f"http://127.0.0.1:{_free_port()}/gone")  # nobody listens
    url, arn = _queue(aws, f"alive-{tag()}")
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn,
                  Attributes={"RawMessageDelivery": "true"})
    sns.publish(TopicArn=topic, Message=json.dumps({"still": "delivered"}))
    assert _bodies(aws, url) == [{"still": "delivered"}]
