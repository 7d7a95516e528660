"""The fabric as data: idempotent apply, S3/EventBridge/SNS filtering, pattern checks, show."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError
from typer.testing import CliRunner

from event_bridge.apply import apply_fabric
from event_bridge.cli import app
from event_bridge.ensure_queues import queue_url_or_none
from event_bridge.ensure_rules import PatternCheckFailed
from event_bridge.fabric import (
    DEFAULT_FABRIC,
    ArchiveSpec,
    BucketSpec,
    ConsumerSpec,
    DedupSpec,
    Fabric,
    FabricError,
    PatternExamples,
    QueueNotification,
    QueueSpec,
    RuleSpec,
    SubscriptionSpec,
    TargetSpec,
    TopicSpec,
    load_fabric,
)
from event_bridge.runtime import load_handler
from event_bridge.s3_events import parse_s3_events
from event_bridge.show import show
from event_bridge.topology import FanOutTopology, topology_fabric
from flows.spec import DEFAULT_SPEC, load_spec
from infra.aws.clients import AwsTarget
from infra.aws.embedded import MotoServer
from tests.events_support import tag


def _s3_pattern(bucket: str, **obj: object) -> dict:
    return {"source": ["aws.s3"], "detail-type": ["Object Created"],
            "detail": {"bucket": {"name": [bucket]}, **({"object": obj} if obj else {})}}


def _full_fabric(t: str, filter_size: int = 10, visibility: int = 300) -> Fabric:
    bucket = f"fab-{t}"
    return Fabric(
        buckets=[BucketSpec(name=bucket, queue_notifications=[QueueNotification(
            id=f"uploads-{t}", queue=f"uploads-{t}", prefix="inputs/", suffix=".npy")])],
        queues=[QueueSpec(name=f"all-{t}", visibility_timeout=visibility),
                QueueSpec(name=f"manifests-{t}"), QueueSpec(name=f"big-{t}"),
                QueueSpec(name=f"uploads-{t}"), QueueSpec(name=f"runs-{t}.fifo")],
        topics=[TopicSpec(name=f"results-{t}", subscriptions=[
                    SubscriptionSpec(queue=f"all-{t}"),
                    SubscriptionSpec(queue=f"manifests-{t}", filter_policy={"detail": {"object": {
                        "key": [{"suffix": "manifest.json"}],
                        "size": [{"numeric": [">", filter_size]}]}}})]),
                TopicSpec(name=f"runs-{t}.fifo",
                          subscriptions=[SubscriptionSpec(queue=f"runs-{t}.fifo")])],
        rules=[RuleSpec(name=f"runs-{t}", pattern=_s3_pattern(bucket, key=[{"prefix": "runs/"}]),
                        targets=[TargetSpec(topic=f"results-{t}")]),
               RuleSpec(name=f"big-{t}", pattern=_s3_pattern(
                   bucket, size=[{"numeric": [">=", 1000]}],
                   key=[{"anything-but": {"suffix": ".json"}}]),
                   targets=[TargetSpec(queue=f"big-{t}")])],
        archives=[ArchiveSpec(name=f"arch-{t}", pattern=_s3_pattern(bucket))],
        dedup=DedupSpec(table=f"dedup-{t}"),
    )


def _keys(aws, url: str) -> list[str]:
    sqs, keys = aws.client("sqs"), []
    while True:
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not msgs:
            return sorted(keys)
        for m in msgs:
            keys += [e.key for e in parse_s3_events(m["Body"])]
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def test_apply_twice_changes_nothing_and_duplicates_nothing(aws):
    t = tag()
    fabric = _full_fabric(t)
    first = apply_fabric(aws, fabric)
    assert any(c.startswith("created archive") for c in first.changes)
    again = apply_fabric(aws, fabric)
    assert again.changes == []
    assert again.as_dict()["queues"] == first.as_dict()["queues"]

    sns, sqs, events, s3 = (aws.client(s) for s in ("sns", "sqs", "events", "s3"))
    subs = sns.list_subscriptions_by_topic(TopicArn=first.topics[f"results-{t}"])
    assert len(subs["Subscriptions"]) == 2
    for rule in fabric.rules:
        assert len(events.list_rules(NamePrefix=rule.name)["Rules"]) == 1
        assert len(events.list_targets_by_rule(Rule=rule.name)["Targets"]) == 1
    assert len(events.list_archives(NamePrefix=f"arch-{t}")["Archives"]) == 1
    assert len(sqs.list_queues(QueueNamePrefix=f"all-{t}")["QueueUrls"]) == 2  # queue + DLQ
    config = s3.get_bucket_notification_configuration(Bucket=f"fab-{t}")
    assert len(config["QueueConfigurations"]) == 1 and "EventBridgeConfiguration" in config

    # A changed fabric updates in place: still one subscription, one queue, new settings.
    changed = apply_fabric(aws, _full_fabric(t, filter_size=20, visibility=120))
    assert sorted(changed.changes) == [
        f"updated queue all-{t}: VisibilityTimeout",
        f"updated subscription manifests-{t} to results-{t}: FilterPolicy"]
    assert len(sns.list_subscriptions_by_topic(
        TopicArn=first.topics[f"results-{t}"])["Subscriptions"]) == 2
    report = show(aws, _full_fabric(t, filter_size=20, visibility=120))
    assert report["in_sync"], report
    assert not show(aws, fabric)["in_sync"]  # the old file no longer matches


def test_s3_events_are_filtered_by_eventbridge_sns_and_notifications(aws):
    t = tag()
    applied = apply_fabric(aws, _full_fabric(t))
    s3 = aws.client("s3")
    puts = {"runs/a/manifest.json": 50, "runs/a/tiny-manifest.json": 5, "runs/a/field.npy": 2000,
            "runs/a/big.json": 2000, "inputs/x y.npy": 1, "inputs/x.txt": 1, "other/z.npy": 2000}
    for key, size in puts.items():
        s3.put_object(Bucket=f"fab-{t}", Key=key, Body=b"0" * size)
    q = {name.split("-")[0]: ref.url for name, ref in applied.queues.items()}
    assert _keys(aws, q["all"]) == sorted(k for k in puts if k.startswith("runs/"))
    assert _keys(aws, q["manifests"]) == ["runs/a/manifest.json"]   # SNS body filter policy
    assert _keys(aws, q["big"]) == ["other/z.npy", "runs/a/field.npy"]  # numeric, anything-but
    assert _keys(aws, q["uploads"]) == ["inputs/x y.npy"]  # direct notification, decoded key


def test_s3_events_get_their_own_ids_on_the_emulator(aws):
    t = tag()
    applied = apply_fabric(aws, _full_fabric(t))
    s3 = aws.client("s3")
    for i in range(3):
        s3.put_object(Bucket=f"fab-{t}", Key="runs/same/manifest.json", Body=f"{i}".encode() * 20)
    msgs = aws.client("sqs").receive_message(QueueUrl=applied.queues[f"all-{t}"].url,
                                             MaxNumberOfMessages=10)["Messages"]
    events = [e for m in msgs for e in parse_s3_events(m["Body"])]
    assert len(events) == 3
    assert len({e.event_id for e in events}) == 3
    assert len({e.identity for e in events}) == 3  # each write is its own event


def test_network_change_rule_is_checked_with_test_event_pattern(aws):
    fabric = load_fabric()
    rule = next(r for r in fabric.rules if r.name == "clusterflow-network-changes")
    events = aws.client("events")
    for example in rule.examples.match:
        assert events.test_event_pattern(EventPattern=json.dumps(rule.pattern),
                                         Event=json.dumps(example))["Result"] is True
    for example in rule.examples.no_match:
        assert events.test_event_pattern(EventPattern=json.dumps(rule.pattern),
                                         Event=json.dumps(example))["Result"] is False
    with pytest.raises(ClientError, match="Parameter Event is not valid"):
        events.test_event_pattern(EventPattern=json.dumps(rule.pattern),
                                  Event=json.dumps({"source": "aws.ec2"}))

    # A pattern that does not do what its examples say stops the apply before it creates.
    t = tag()
    wrong = rule.model_copy(update={"name": f"net-{t}", "examples": PatternExamples(
        match=rule.examples.no_match[:1]), "targets": [TargetSpec(queue=f"alerts-{t}")]})
    with pytest.raises(PatternCheckFailed, match=f"rule net-{t}: its pattern does not match"):
        apply_fabric(aws, Fabric(queues=[QueueSpec(name=f"alerts-{t}")], rules=[wrong],
                                 dedup=None))
    assert queue_url_or_none(aws.client("sqs"), f"alerts-{t}") is None

    # The rule delivers matching API calls to the alert topic and nothing else.
    alert = rule.model_copy(update={"name": f"net-{t}",
                                    "targets": [TargetSpec(topic=f"alerts-{t}")]})
    applied = apply_fabric(aws, Fabric(
        queues=[QueueSpec(name=f"alerts-{t}")], rules=[alert], dedup=None,
        topics=[TopicSpec(name=f"alerts-{t}", subscriptions=[SubscriptionSpec(
            queue=f"alerts-{t}")])]))
    entries = [{"Source": e["source"], "DetailType": e["detail-type"],
                "Detail": json.dumps(e["detail"])}
               for e in rule.examples.match + rule.examples.no_match]
    assert events.put_events(Entries=entries)["FailedEntryCount"] == 0
    got = aws.client("sqs").receive_message(QueueUrl=applied.queues[f"alerts-{t}"].url,
                                            MaxNumberOfMessages=10)["Messages"]
    assert sorted(json.loads(m["Body"])["detail"]["eventName"] for m in got) == [
        "AuthorizeSecurityGroupIngress", "ReplaceNetworkAclEntry"]


def test_fabric_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "fabric.yaml"
    bad.write_text("queues: [{name: a}]\nconsumers: [{queue: a, handler: x}]\n")
    with pytest.raises(FabricError, match=r"consumers\.0\.handler: .*'package.module:function'"):
        load_fabric(bad)
    bad.write_text("queues: [{name: a}]\ntopics: [{name: t, subscriptions: [{queue: nope}]}]\n"
                   "rules: [{name: r, pattern: {source: [x]}, targets: [{topic: gone}]}]\n")
    with pytest.raises(FabricError) as e:
        load_fabric(bad)
    assert "subscribed queue 'nope' is not declared" in str(e.value)
    assert "target topic 'gone' is not declared" in str(e.value)


def test_the_pipeline_topology_is_the_default_fabric_s_rule():
    """`clusterflow run` and `events apply` must converge on one rule, not overwrite each other."""
    spec = load_spec(DEFAULT_SPEC)
    topo = topology_fabric(FanOutTopology(
        results_bucket=spec.storage.results_bucket, key_prefix=spec.storage.results_prefix,
        key_suffix="manifest.json", topic=spec.fanout.topic, queues=tuple(spec.fanout.queues),
        max_receive_count=spec.fanout.max_receive_count,
        visibility_timeout=spec.fanout.visibility_timeout))
    fabric = load_fabric()
    (rule,) = topo.rules
    mine = next(r for r in fabric.rules if r.name == rule.name)
    assert mine.pattern == rule.pattern and mine.targets == rule.targets
    for q in topo.queues:
        assert fabric.queue(q.name).max_receive_count == q.max_receive_count
        assert fabric.queue(q.name).visibility_timeout == q.visibility_timeout
    assert {s.queue for s in topo.topics[0].subscriptions} <= {
        s.queue for s in fabric.topic(spec.fanout.topic).subscriptions}
    for c in fabric.consumers:
        if c.handler.startswith("event_bridge.handlers:"):
            assert callable(load_handler(c.handler))


@pytest.fixture(scope="module")
def private_endpoint(tmp_path_factory) -> AwsTarget:
    """The default fabric uses fixed names; give it a server of its own."""
    server = MotoServer(tmp_path_factory.mktemp("moto-fabric") / "moto.log").start()
    yield AwsTarget(region="us-east-1", endpoint_url=server.url, embedded=True)
    server.stop()


def test_cli_apply_and_show_the_default_fabric(private_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", private_endpoint.endpoint_url)
    runner = CliRunner()
    first = runner.invoke(app, ["apply", "--fabric", str(DEFAULT_FABRIC)])
    assert first.exit_code == 0, first.output
    assert "created queue postprocess" in first.output
    second = runner.invoke(app, ["apply"])
    assert second.exit_code == 0 and "no change" in second.output, second.output
    shown = runner.invoke(app, ["show", "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert report["in_sync"] and report["missing"] == []
    assert report["queues"]["postprocess"]["dlq"] == "postprocess-dlq"
    assert report["queues"]["run-events.fifo"]["dlq"] == "run-events-dlq.fifo"
    assert report["dedup_table"]["status"] == "ACTIVE"


def test_cli_refuses_to_act_on_a_throwaway_endpoint(monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("CLUSTERFLOW_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["show"])
    assert result.exit_code == 2
    assert "clusterflow local up" in result.output


def test_queue_consumer_cannot_take_an_on_failure_queue():
    with pytest.raises(ValueError, match="on_failure_queue and filter_policy apply to topic"):
        ConsumerSpec(queue="q", handler="a.b:c", on_failure_queue="f")
