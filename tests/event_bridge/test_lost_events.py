"""Issue 13, class 2: lost events and broken topology.

* A bridge consumer with no Prefect API to reach fails its messages (retried, then the DLQ)
  and records nothing as processed; it never emits into a throw-away server.
* A spec with another results bucket gets a rule of its own; the shared topic keeps every
  spec's grants; ``events show`` names a rewritten rule's drift in its text output.
* A stale or foreign event on a run's fan-out queue never fails that run's consume stage
  and is left for its own consumer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from event_bridge.apply import apply_fabric
from event_bridge.cli import app
from event_bridge.consumer import consume_until, parse_event
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
from event_bridge.grants import granted
from event_bridge.topology import FanOutTopology, apply_topology
from flows.pipeline import ensure_bucket
from infra.staging.objects import sha256_file, upload
from tests.events_support import tag

REPO = Path(__file__).resolve().parents[2]


def _write(fabric: Fabric, path: Path) -> Path:
    path.write_text(yaml.safe_dump(fabric.model_dump(mode="json", exclude_none=True)))
    return path


def _upload_event(bucket: str, key: str) -> str:
    return json.dumps({
        "version": "0", "id": f"ev-{tag()}", "detail-type": "Object Created",
        "source": "aws.s3", "time": "2026-01-02T03:04:05Z", "region": "us-east-1",
        "resources": [], "detail": {"bucket": {"name": bucket}, "object": {
            "key": key, "size": 3, "etag": "abc", "sequencer": "0055AED6DCD90281E5"}}})


def test_bridge_without_a_prefect_api_fails_its_messages_into_the_dlq(aws, tmp_path):
    """No PREFECT_API_URL and no local stack: nothing acknowledged, nothing recorded."""
    t = tag()
    queue = f"uploads-{t}"
    fabric = Fabric(
        queues=[QueueSpec(name=queue, max_receive_count=2)],
        consumers=[ConsumerSpec(queue=queue, handler="event_bridge.prefect_bridge:handler")],
        dedup=DedupSpec(table=f"dedup-{t}"))
    applied = apply_fabric(aws, fabric)
    sqs = aws.client("sqs")
    sqs.send_message(QueueUrl=applied.queues[queue].url,
                     MessageBody=_upload_event(f"in-{t}", "inputs/uploads/x.npy"))
    prefect_home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(AWS_ENDPOINT_URL=aws.endpoint_url, PREFECT_HOME=str(prefect_home),
               CLUSTERFLOW_HOME=str(tmp_path / "no-stack"), PYTHONPATH=str(REPO),
               CLUSTERFLOW_INPUT_BUCKET=f"in-{t}", CLUSTERFLOW_RESULTS_BUCKET=f"out-{t}")
    proc = subprocess.run(
        [sys.executable, "-m", "event_bridge.cli", "drain", "--fabric",
         str(_write(fabric, tmp_path / "f.yaml")), "--backoff", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    summary = json.loads(proc.stdout)
    entry = summary["queues"][queue]
    assert (entry["processed"], entry["failed"], entry["sent_to_dlq"], entry["dlq_depth"]) == (
        0, 2, 1, 1), proc.stderr[-3000:]
    assert "PREFECT_API_URL" in proc.stderr  # the failure says what to do
    # The event is in the DLQ, and the dedup table records nothing as processed.
    (dead,) = sqs.receive_message(QueueUrl=applied.queues[queue].dlq_url,
                                  WaitTimeSeconds=1)["Messages"]
    assert parse_event(dead["Body"]).key == "inputs/uploads/x.npy"
    assert aws.client("dynamodb").scan(TableName=f"dedup-{t}")["Items"] == []
    # No throw-away Prefect server was started (it would have created its database).
    assert not list(prefect_home.rglob("*.db"))


def _topo(t: str, bucket: str) -> FanOutTopology:
    return FanOutTopology(results_bucket=bucket, key_prefix="runs/",
                          key_suffix="manifest.json", topic=f"res-{t}",
                          queues=(f"pp-{t}",), max_receive_count=2, visibility_timeout=0)


def _drain_keys(aws, url: str) -> set[tuple[str, str]]:
    sqs, got = aws.client("sqs"), set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                   WaitTimeSeconds=1).get("Messages", [])
        for m in msgs:
            e = parse_event(m["Body"])
            got.add((e.bucket, e.key))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        if len(got) >= 2 and not msgs:
            break
    return got


def test_a_spec_with_another_results_bucket_does_not_cut_the_first_one_off(aws):
    t = tag()
    a, b = _topo(t, f"ra-{t}"), _topo(t, f"rb-{t}")
    for topo in (a, b):
        ensure_bucket(aws, topo.results_bucket)
    events, sns, s3 = aws.client("events"), aws.client("sns"), aws.client("s3")
    # What older versions left: one shared rule, rewritten by whichever spec ran last.
    legacy = events.put_rule(Name=a.legacy_rule_name, EventPattern=json.dumps(
        b.event_pattern()))["RuleArn"]
    first = apply_topology(aws, a)
    events.put_targets(Rule=a.legacy_rule_name,
                       Targets=[{"Id": "fanout-topic", "Arn": first.topic_arn}])
    second = apply_topology(aws, b)

    assert a.rule_name != b.rule_name
    names = {r["Name"] for r in events.list_rules(NamePrefix=f"res-{t}")["Rules"]}
    assert names == {a.rule_name, b.rule_name}  # the legacy shared rule was retired
    for topo in (a, b):
        pattern = json.loads(events.describe_rule(Name=topo.rule_name)["EventPattern"])
        assert pattern["detail"]["bucket"]["name"] == [topo.results_bucket]
    # The shared topic lets both rules publish (the second apply kept the first's grant).
    policy = sns.get_topic_attributes(TopicArn=first.topic_arn)["Attributes"]["Policy"]
    assert granted(policy)["events.amazonaws.com"] == sorted([first.rule_arn,
                                                             second.rule_arn])
    assert legacy not in granted(policy)["events.amazonaws.com"]
    # And both buckets' manifests still fan out, each exactly once.
    s3.put_object(Bucket=a.results_bucket, Key="runs/r1/manifest.json", Body=b"{}")
    s3.put_object(Bucket=b.results_bucket, Key="runs/r2/manifest.json", Body=b"{}")
    assert _drain_keys(aws, first.queue_urls[f"pp-{t}"]) == {
        (a.results_bucket, "runs/r1/manifest.json"), (b.results_bucket, "runs/r2/manifest.json")}


def test_show_names_a_rewritten_rule_s_drift_in_its_text_output(aws, tmp_path, monkeypatch):
    t = tag()
    bucket, other = f"fa-{t}", f"fb-{t}"
    pattern = {"source": ["aws.s3"], "detail-type": ["Object Created"],
               "detail": {"bucket": {"name": [bucket]}}}
    fabric = Fabric(
        buckets=[BucketSpec(name=bucket)], queues=[QueueSpec(name=f"q-{t}")],
        topics=[TopicSpec(name=f"t-{t}", subscriptions=[SubscriptionSpec(queue=f"q-{t}")])],
        rules=[RuleSpec(name=f"r-{t}", pattern=pattern,
                        targets=[TargetSpec(topic=f"t-{t}", id="fanout-topic")])],
        dedup=DedupSpec(table=f"dedup-{t}"))
    apply_fabric(aws, fabric)
    path = _write(fabric, tmp_path / "fabric.yaml")
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.endpoint_url)
    clean = CliRunner().invoke(app, ["show", "--fabric", str(path)])
    assert clean.exit_code == 0 and "in sync with the fabric" in clean.output, clean.output

    rewritten = {**pattern, "detail": {"bucket": {"name": [other]}}}
    aws.client("events").put_rule(Name=f"r-{t}", EventPattern=json.dumps(rewritten))
    shown = CliRunner().invoke(app, ["show", "--fabric", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "not in sync" in shown.output
    assert (f'drift: rule r-{t}: pattern.detail.bucket.name is ["{other}"], the fabric says '
            f'["{bucket}"]') in shown.output


def _manifest(aws, tmp_path: Path, bucket: str, run: str) -> str:
    data = tmp_path / f"{run}.bin"
    data.write_bytes(run.encode() * 100)
    upload(aws, data, bucket, f"runs/{run}/data.bin")
    manifest = tmp_path / f"{run}.json"
    manifest.write_text(json.dumps({"files": [{"name": "data.bin",
                                               "sha256": sha256_file(data)}]}))
    upload(aws, manifest, bucket, f"runs/{run}/manifest.json")
    return f"runs/{run}/manifest.json"


@pytest.fixture
def fanout(aws):
    t = tag()
    topo = _topo(t, f"fo-{t}")
    ensure_bucket(aws, topo.results_bucket)
    return topo, apply_topology(aws, topo)


def test_stale_and_foreign_events_never_fail_a_run_s_consume_stage(aws, tmp_path, fanout):
    topo, applied = fanout
    (queue,) = topo.queues
    url = applied.queue_urls[queue]
    s3, sqs = aws.client("s3"), aws.client("sqs")
    stale = _manifest(aws, tmp_path, topo.results_bucket, "gone")
    s3.delete_object(Bucket=topo.results_bucket, Key=stale)  # its manifest no longer exists
    other = _manifest(aws, tmp_path, topo.results_bucket, "other")  # a concurrent run's event
    mine = _manifest(aws, tmp_path, topo.results_bucket, "mine")

    report = consume_until(aws, queue, url, want_key=mine, timeout_s=20)
    assert report.keys == [mine] and report.verified == 1 and report.failed == []
    assert f"s3://{topo.results_bucket}/{stale}" in report.left
    # The other run's event was left for its own consume stage, which still gets it.
    theirs = consume_until(aws, queue, url, want_key=other, timeout_s=20)
    assert theirs.keys == [other]
    # Nobody claims the stale one: SQS's redrive (maxReceiveCount 2) dead-letters it.
    deadline = time.monotonic() + 20
    dead: list[dict] = []
    while not dead and time.monotonic() < deadline:
        sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0)
        dead = sqs.receive_message(QueueUrl=applied.dlq_urls[queue]).get("Messages", [])
    assert [parse_event(m["Body"]).key for m in dead] == [stale]


def test_per_bucket_rule_names_stay_valid_and_distinct_for_long_bucket_names():
    base = "r" * 60
    topos = [_topo("x", f"{base}-{i}") for i in (1, 2)]
    names = [t.rule_name for t in topos]
    assert names[0] != names[1]
    for topo in topos:  # a rule name AWS accepts: [.-_A-Za-z0-9], at most 64
        assert RuleSpec(name=topo.rule_name, pattern=topo.event_pattern(),
                        targets=[TargetSpec(topic=topo.topic)]).name == topo.rule_name
