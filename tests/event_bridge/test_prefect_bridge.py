"""The S3 -> Prefect event bridge: which objects become which Prefect events, and failures.

Emission to a live Prefect server with triggers is covered in test_deployments.py; here the
Prefect API is unreachable on purpose, so the handler must not acknowledge what it could not
deliver.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote_plus

import pytest

from event_bridge import prefect_bridge
from event_bridge.consumer import PoisonMessage
from event_bridge.idempotency import DedupStore
from event_bridge.lambda_shapes import new_context
from event_bridge.prefect_bridge import BridgeConfig, prefect_events, to_prefect_event
from event_bridge.s3_events import parse_s3_events
from infra.aws.clients import AwsTarget

CONFIG = BridgeConfig(input_bucket="in-b", input_prefix="inputs/", results_bucket="out-b",
                      results_prefix="runs/")


def _eventbridge(bucket: str, key: str, sequencer: str = "0055AED6DCD90281E5",
                 kind: str = "Object Created") -> str:
    return json.dumps({
        "version": "0", "id": str(uuid.uuid4()), "detail-type": kind, "source": "aws.s3",
        "time": "2026-01-02T03:04:05Z", "region": "us-east-1", "resources": [],
        "detail": {"bucket": {"name": bucket},
                   "object": {"key": key, "size": 3, "etag": "abc", "sequencer": sequencer}}})


def _notification(bucket: str, key: str, sequencer: str = "0055AED6DCD90281E5") -> str:
    return json.dumps({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-01-02T03:04:05.000Z", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket},
               "object": {"key": quote_plus(key), "size": 3, "eTag": "abc",
                          "sequencer": sequencer}}}]})


def _sns(body: str) -> str:
    return json.dumps({"Type": "Notification", "MessageId": str(uuid.uuid4()),
                       "TopicArn": "arn:aws:sns:us-east-1:123456789012:t", "Message": body})


def test_roles() -> None:
    assert CONFIG.role_of("in-b", "inputs/uploads/x.npy") == "input"
    # The pipeline caches its generated initial conditions here: not uploads.
    assert CONFIG.role_of("in-b", "inputs/heat-256x256.npy") is None
    assert CONFIG.role_of("in-b", "elsewhere/x.npy") is None
    assert CONFIG.role_of("out-b", "runs/r1/manifest.json") == "result"
    assert CONFIG.role_of("out-b", "runs/r1/field.npy") is None
    assert CONFIG.role_of("out-b", "runs/r1/summary.json") is None
    assert CONFIG.role_of("other", "inputs/uploads/x.npy") is None


def test_prefect_events_and_their_ids() -> None:
    [event] = prefect_events(_eventbridge("out-b", "runs/r1/manifest.json"), CONFIG)
    assert event.event == "s3.object.created"
    assert event.resource.id == "s3.object.out-b/runs/r1/manifest.json"
    assert event.resource["clusterflow.role"] == "result"
    assert event.resource["clusterflow.run-id"] == "r1"
    assert event.resource["s3.bucket"] == "out-b"
    assert event.resource["s3.key"] == "runs/r1/manifest.json"

    # One S3 write, however it is delivered (EventBridge, S3 notification, inside SNS),
    # is one Prefect event id; another write of the same key is another event.
    key = "inputs/uploads/a b.npy"
    ids = {e.id for body in (_eventbridge("in-b", key), _notification("in-b", key),
                             _sns(_eventbridge("in-b", key)), _sns(_notification("in-b", key)))
           for e in prefect_events(body, CONFIG)}
    assert len(ids) == 1
    [upload] = prefect_events(_notification("in-b", key), CONFIG)
    assert upload.resource["s3.key"] == key and upload.resource["clusterflow.role"] == "input"
    [later] = prefect_events(_eventbridge("in-b", key, sequencer="0055AED6DCD90281F0"), CONFIG)
    assert later.id not in ids

    [obj] = parse_s3_events(_eventbridge("in-b", "inputs/x.npy"))
    assert to_prefect_event(obj, CONFIG) is None  # not under the uploads prefix


@pytest.mark.parametrize("body", [
    "{not json", "[]", json.dumps({"hello": "world"}),
    json.dumps({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"}]}),
])
def test_poison_messages_are_refused(body: str) -> None:
    with pytest.raises(PoisonMessage):
        prefect_events(body, CONFIG)


def test_nothing_to_start() -> None:
    assert prefect_events(_eventbridge("in-b", "inputs/uploads/x.npy",
                                       kind="Object Tags Added"), CONFIG) == []
    assert prefect_events(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent",
                                      "Bucket": "in-b"}), CONFIG) == []
    assert prefect_events(_eventbridge("other", "inputs/uploads/x.npy"), CONFIG) == []


def test_config_from_env() -> None:
    env = {"CLUSTERFLOW_INPUT_BUCKET": "a-in", "CLUSTERFLOW_RESULTS_BUCKET": "a-out",
           "CLUSTERFLOW_RESULTS_PREFIX": "done/", "CLUSTERFLOW_UPLOAD_PREFIX": "drop/"}
    config = BridgeConfig.from_env(env)
    assert config == BridgeConfig(input_bucket="a-in", results_bucket="a-out",
                                  results_prefix="done/", upload_prefix="drop/")
    assert config.role_of("a-in", "drop/f.npy") == "input"
    bundled = BridgeConfig.from_env({})  # the bundled spec's buckets
    assert bundled.input_bucket == "clusterflow-demo-inputs"
    assert bundled.uploads == "inputs/uploads/"
    assert BridgeConfig.from_env({"CLUSTERFLOW_INPUT_BUCKET": "b-in"}).results_bucket == (
        bundled.results_bucket)


def test_handler_retries_only_poison_and_undelivered(aws: AwsTarget,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.aws.embedded import _free_port

    monkeypatch.setattr(prefect_bridge, "_config", CONFIG)
    table = f"bridge-dedup-{uuid.uuid4().hex[:8]}"
    context = new_context("bridge-test", aws.region, 30.0, aws, table)
    records = [
        {"messageId": "poison", "body": "{oops"},
        {"messageId": "unrelated", "body": _eventbridge("other", "inputs/uploads/x.npy")},
        {"messageId": "tags", "body": _eventbridge("in-b", "inputs/uploads/x.npy",
                                                   kind="Object Tags Added")},
        {"messageId": "upload", "body": _eventbridge("in-b", "inputs/uploads/x.npy")},
    ]
    # No Prefect API answers: the upload's event cannot be confirmed, so its message is
    # retried (acknowledging it would lose the upload) and its dedup claim is released.
    dead = f"http://127.0.0.1:{_free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: dead}):
        response = prefect_bridge.handler({"Records": records}, context)
    assert response == {"batchItemFailures": [{"itemIdentifier": "poison"},
                                              {"itemIdentifier": "upload"}]}
    store = DedupStore(aws, table, create=False)
    [upload] = prefect_events(records[-1]["body"], CONFIG)
    assert store.status(f"bridge-test#{upload.id}") is None
    assert store.status("bridge-test#sqs:unrelated") == "COMPLETED"
    assert store.status("bridge-test#sqs:tags") == "COMPLETED"
