"""Operating the fabric: drain's summary, DLQ inspection and redrive, archive replay, SNS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from typer.testing import CliRunner

from event_bridge.apply import apply_fabric
from event_bridge.cli import app
from event_bridge.dlq import list_dlq, redrive
from event_bridge.fabric import (
    ArchiveSpec,
    BucketSpec,
    ConsumerSpec,
    DedupSpec,
    Fabric,
    QueueSpec,
    RuleSpec,
    SubscriptionSpec,
    TargetSpec,
    TopicSpec,
    load_fabric,
)
from event_bridge.handlers import security_alert
from event_bridge.runtime import Backoff
from event_bridge.service import drain
from event_bridge.sns_invoker import SnsInvoker
from infra.aws.clients import AwsTarget
from tests.events_support import COUNTS_ENV, counts, event_body, make_counter_table, tag

REPO = Path(__file__).resolve().parents[2]
FAST = Backoff(base_s=0)


def _write(fabric: Fabric, path: Path) -> Path:
    path.write_text(yaml.safe_dump(fabric.model_dump(mode="json", exclude_none=True)))
    return path


def test_drain_prints_a_json_summary_per_queue(aws, tmp_path):
    t = tag()
    table = make_counter_table(aws)
    fabric = Fabric(
        queues=[QueueSpec(name=f"good-{t}"), QueueSpec(name=f"bad-{t}", max_receive_count=2)],
        consumers=[ConsumerSpec(queue=f"good-{t}", handler="tests.events_support:count_events"),
                   ConsumerSpec(queue=f"bad-{t}", handler="tests.events_support:always_fail")],
        dedup=DedupSpec(table=f"dedup-{t}"))
    applied = apply_fabric(aws, fabric)
    sqs = aws.client("sqs")
    for i in range(4):
        sqs.send_message(QueueUrl=applied.queues[f"good-{t}"].url, MessageBody=event_body(f"g{i}"))
    sqs.send_message(QueueUrl=applied.queues[f"bad-{t}"].url, MessageBody="poison")
    env = {**os.environ, "AWS_ENDPOINT_URL": aws.endpoint_url, COUNTS_ENV: table,
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "event_bridge.cli", "drain", "--fabric",
         str(_write(fabric, tmp_path / "f.yaml")), "--backoff", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert set(summary) >= {"processed", "failed", "sent_to_dlq", "seconds", "queues"}
    assert (summary["processed"], summary["failed"], summary["sent_to_dlq"]) == (4, 2, 1)
    good, bad = summary["queues"][f"good-{t}"], summary["queues"][f"bad-{t}"]
    assert {"processed", "failed", "sent_to_dlq", "received", "dlq_depth"} <= set(good)
    assert (good["processed"], good["failed"], good["dlq_depth"]) == (4, 0, 0)
    assert (bad["processed"], bad["failed"], bad["sent_to_dlq"], bad["dlq_depth"]) == (0, 2, 1, 1)
    assert counts(aws, table) == {f"g{i}": 1 for i in range(4)}


def test_dlq_ls_and_redrive_move_every_message_back(aws):
    t = tag()
    fabric = Fabric(queues=[QueueSpec(name=f"work-{t}", max_receive_count=2)],
                    consumers=[ConsumerSpec(queue=f"work-{t}",
                                            handler="tests.events_support:always_fail")],
                    dedup=DedupSpec(table=f"dedup-{t}"))
    q = apply_fabric(aws, fabric).queues[f"work-{t}"]
    sqs = aws.client("sqs")
    sent = {}
    for i in range(12):  # more than one receive batch
        body = json.dumps({"n": i, "pad": "x" * (i * 1000)})
        sent[body] = sqs.send_message(QueueUrl=q.url, MessageBody=body, MessageAttributes={
            "kind": {"DataType": "String", "StringValue": f"k{i}"}})["MessageId"]
    assert drain(aws, fabric, backoff=FAST, timeout_s=60)["sent_to_dlq"] == 12

    listing = list_dlq(aws, f"work-{t}", limit=5)
    assert listing["dlq"] == f"work-{t}-dlq" and listing["depth"]["visible"] == 12
    assert len(listing["messages"]) == 5
    assert all(m["receive_count"] >= 2 for m in listing["messages"])
    # Peeking leaves them in place and visible.
    assert list_dlq(aws, f"work-{t}", limit=50)["depth"]["visible"] == 12

    result = redrive(aws, f"work-{t}")
    assert (result.method, result.moved) == ("copy", 12)  # moto lacks StartMessageMoveTask
    assert list_dlq(aws, f"work-{t}")["depth"] == {"visible": 0, "in_flight": 0}
    back = []
    while msgs := sqs.receive_message(QueueUrl=q.url, MaxNumberOfMessages=10,
                                      MessageAttributeNames=["All"]).get("Messages", []):
        back += msgs
        sqs.delete_message_batch(QueueUrl=q.url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])
    assert sorted(m["Body"] for m in back) == sorted(sent)
    assert {m["MessageAttributes"]["kind"]["StringValue"] for m in back} == {
        f"k{i}" for i in range(12)}


def _stub_queue_lookup(stub: Stubber, name: str) -> None:
    url = f"https://sqs.eu-west-3.amazonaws.com/123456789012/{name}"
    stub.add_response("get_queue_url", {"QueueUrl": url}, {"QueueName": name})
    stub.add_response("get_queue_attributes", {"Attributes": {
        "QueueArn": f"arn:aws:sqs:eu-west-3:123456789012:{name}", "VisibilityTimeout": "300",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn":
                                     f"arn:aws:sqs:eu-west-3:123456789012:{name}-dlq",
                                     "maxReceiveCount": 3})}})
    stub.add_response("get_queue_url", {"QueueUrl": f"{url}-dlq"}, {"QueueName": f"{name}-dlq"})
    stub.add_response("get_queue_attributes", {"Attributes": {
        "QueueArn": f"arn:aws:sqs:eu-west-3:123456789012:{name}-dlq"}})


def test_redrive_on_aws_uses_the_move_task_and_never_hides_its_errors(monkeypatch):
    """moto has no StartMessageMoveTask: the AWS side of redrive is checked with a Stubber."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stub")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stub")
    target = AwsTarget(region="eu-west-3")  # real AWS: no endpoint
    sqs = target.client("sqs")
    with Stubber(sqs) as stub:
        _stub_queue_lookup(stub, "jobs")
        stub.add_response("start_message_move_task", {"TaskHandle": "h1"})
        stub.add_response("list_message_move_tasks", {"Results": [
            {"TaskHandle": "h1", "Status": "COMPLETED", "ApproximateNumberOfMessagesMoved": 7}]})
        result = redrive(target, "jobs")
        assert (result.method, result.moved, result.task_handle) == (
            "StartMessageMoveTask", 7, "h1")

        _stub_queue_lookup(stub, "jobs")
        stub.add_client_error("start_message_move_task", "AccessDenied", "not allowed", 403)
        with pytest.raises(ClientError, match="AccessDenied"):
            redrive(target, "jobs")
        _stub_queue_lookup(stub, "jobs")  # even a 500 from AWS itself is not "unimplemented"
        stub.add_client_error("start_message_move_task", "500", "Internal Server Error", 500)
        with pytest.raises(ClientError):
            redrive(target, "jobs")
        stub.assert_no_pending_responses()


def _next_second() -> datetime:
    """Sleep past the next whole second (replay windows have one-second resolution)."""
    time.sleep(1.05 - (time.time() % 1))
    return datetime.fromtimestamp(int(time.time()), timezone.utc)


def test_replay_redelivers_the_window_and_consumers_stay_idempotent(aws, monkeypatch,
                                                                     tmp_path):
    t = tag()
    bucket = f"arc-{t}"
    table = make_counter_table(aws)
    monkeypatch.setenv(COUNTS_ENV, table)
    pattern = {"source": ["aws.s3"], "detail-type": ["Object Created"],
               "detail": {"bucket": {"name": [bucket]}}}
    fabric = Fabric(
        buckets=[BucketSpec(name=bucket)], queues=[QueueSpec(name=f"res-{t}")],
        topics=[TopicSpec(name=f"res-{t}", subscriptions=[SubscriptionSpec(queue=f"res-{t}")])],
        rules=[RuleSpec(name=f"res-{t}", pattern=pattern, targets=[TargetSpec(topic=f"res-{t}")])],
        archives=[ArchiveSpec(name=f"arc-{t}", pattern=pattern)],
        consumers=[ConsumerSpec(queue=f"res-{t}", handler="tests.events_support:count_s3_objects")],
        dedup=DedupSpec(table=f"dedup-{t}"))
    url = apply_fabric(aws, fabric).queues[f"res-{t}"].url
    s3, sqs = aws.client("s3"), aws.client("sqs")

    def put(key: str) -> None:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())

    put("m1")
    assert drain(aws, fabric, backoff=FAST)["processed"] == 1
    since = _next_second()
    def lose_deliveries() -> None:  # a consumer bug acknowledged them without doing the work
        while msgs := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages"):
            for m in msgs:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])

    put("m2")
    put("m3")
    lose_deliveries()
    until = _next_second()
    put("m4")
    lose_deliveries()
    assert counts(aws, table) == {"m1": 1}

    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.endpoint_url)
    path = _write(fabric, tmp_path / "fabric.yaml")
    result = CliRunner().invoke(app, ["replay", "--fabric", str(path), "--since",
                                      since.isoformat(), "--until", until.isoformat(), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "COMPLETED"
    assert drain(aws, fabric, backoff=FAST)["processed"] == 2  # m2 and m3, nothing else
    assert counts(aws, table) == {"m1": 1, "m2": 1, "m3": 1}

    # Replaying everything re-delivers m1..m4; only m4, never processed, runs again.
    result = CliRunner().invoke(app, ["replay", "--fabric", str(path), "--since", "-1h"])
    assert result.exit_code == 0, result.output
    assert drain(aws, fabric, backoff=FAST)["processed"] == 4
    assert counts(aws, table) == {"m1": 1, "m2": 1, "m3": 1, "m4": 1}


def test_sns_consumer_retries_then_sends_to_its_on_failure_queue(aws):
    t = tag()
    applied = apply_fabric(aws, Fabric(
        queues=[QueueSpec(name=f"failed-{t}", dead_letter=False)],
        topics=[TopicSpec(name=f"alerts-{t}")], dedup=None))
    topic, failed_url = applied.topics[f"alerts-{t}"], applied.queues[f"failed-{t}"].url
    attempts: dict[str, int] = {}

    def handler(event, context):
        (record,) = event["Records"]
        assert record["EventSource"] == "aws:sns" and record["Sns"]["TopicArn"] == topic
        message = record["Sns"]["Message"]
        attempts[message] = attempts.get(message, 0) + 1
        if message == "bad" or (message == "flaky" and attempts[message] < 3):
            raise RuntimeError(f"cannot handle {message}")

    sns = aws.client("sns")
    stale = sns.subscribe(TopicArn=topic, Protocol="http", ReturnSubscriptionArn=True,
                          Endpoint=f"http://127.0.0.1:1/notifier-{t}")["SubscriptionArn"]
    invoker = SnsInvoker(aws, topic, handler, name=f"notifier-{t}",
                         on_failure_queue_url=failed_url, retry_delays_s=(0.05,)).start()
    live = [s["SubscriptionArn"] for s in sns.list_subscriptions_by_topic(
        TopicArn=topic)["Subscriptions"]]
    assert stale not in live and live == [invoker.subscription_arn]  # a killed one's leftover
    try:
        for message in ("good", "flaky", "bad"):
            aws.client("sns").publish(TopicArn=topic, Message=message)
        assert invoker.wait_idle(30)
    finally:
        stats = invoker.stop()
    assert attempts == {"good": 1, "flaky": 3, "bad": 3}
    assert (stats.succeeded, stats.sent_to_on_failure, stats.invocations) == (2, 1, 7)
    (dead,) = aws.client("sqs").receive_message(QueueUrl=failed_url,
                                                MaxNumberOfMessages=10)["Messages"]
    record = json.loads(dead["Body"])
    assert record["requestContext"]["condition"] == "RetriesExhausted"
    assert record["requestContext"]["approximateInvokeCount"] == 3
    assert record["requestPayload"]["Records"][0]["Sns"]["Message"] == "bad"
    assert record["responsePayload"]["errorType"] == "RuntimeError"
    subs = aws.client("sns").list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
    assert [s for s in subs if s["Protocol"] == "http"] == []  # unsubscribed on stop


def test_security_alert_handler_reads_cloudtrail_events_from_sns():
    rule = next(r for r in load_fabric().rules if r.name == "clusterflow-network-changes")
    example = rule.examples.match[0]
    event = {"Records": [{"EventSource": "aws:sns", "Sns": {"Message": json.dumps(example)}}]}
    (alert,) = security_alert(event, None)["alerts"]
    assert alert == {"event": "AuthorizeSecurityGroupIngress", "resource": "sg-0123456789abcdef0",
                     "by": "arn:aws:iam::123456789012:user/alice", "time": example["time"]}
    with pytest.raises(KeyError):  # a malformed alert fails the invocation, so it is retried
        security_alert({"Records": [{"Sns": {"Message": "{}"}}]}, None)


def test_consume_runs_until_sigterm_and_cleans_up(aws, tmp_path):
    """What `clusterflow local up` starts and `local down` stops."""
    t = tag()
    table = make_counter_table(aws)
    fabric = Fabric(
        queues=[QueueSpec(name=f"in-{t}"), QueueSpec(name=f"failed-{t}", dead_letter=False)],
        topics=[TopicSpec(name=f"alerts-{t}")],
        consumers=[ConsumerSpec(queue=f"in-{t}", handler="tests.events_support:count_events"),
                   ConsumerSpec(name=f"notify-{t}", topic=f"alerts-{t}",
                                handler="event_bridge.handlers:security_alert",
                                on_failure_queue=f"failed-{t}", retry_delays=[0.05])],
        dedup=DedupSpec(table=f"dedup-{t}"))
    applied = apply_fabric(aws, fabric)
    env = {**os.environ, "AWS_ENDPOINT_URL": aws.endpoint_url, COUNTS_ENV: table,
           "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "event_bridge.cli", "consume", "--fabric",
         str(_write(fabric, tmp_path / "f.yaml")), "--wait", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        sns, sqs = aws.client("sns"), aws.client("sqs")
        topic = applied.topics[f"alerts-{t}"]
        deadline = time.monotonic() + 30
        while not [s for s in sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
                   if s["Protocol"] == "http"]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        sqs.send_message(QueueUrl=applied.queues[f"in-{t}"].url, MessageBody=event_body("c1"))
        sns.publish(TopicArn=topic, Message="not a CloudTrail event")  # fails 3 times
        failed_url = applied.queues[f"failed-{t}"].url
        while not (counts(aws, table) and sqs.get_queue_attributes(
                QueueUrl=failed_url, AttributeNames=["ApproximateNumberOfMessages"])[
                "Attributes"]["ApproximateNumberOfMessages"] == "1"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "consuming" in stderr
    stats = json.loads(stdout)["consumers"]
    assert stats[f"in-{t}"]["processed"] == 1
    assert stats[f"notify-{t}"]["sent_to_on_failure"] == 1
    assert counts(aws, table) == {"c1": 1}
    assert [s for s in sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
            if s["Protocol"] == "http"] == []
