"""The embedded endpoint's Kinesis -> Firehose -> S3 delivery and API Gateway invocation."""

from __future__ import annotations

import gzip
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.infra.telemetry.support import delivered, fresh, objects


def _post(url: str, body: bytes, key: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["x-api-key"] = key
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_kinesis_records_reach_s3_gzipped_under_run_partition_after_the_buffer(aws):
    cfg, ep = fresh(aws, buffer_seconds=2)
    kinesis = aws.client("kinesis")
    recs = [{"run_id": run, "rank": r, "kind": "step", "step": 1}
            for run in ("run-a", "run-b") for r in range(3)]
    out = kinesis.put_records(StreamName=ep.stream, Records=[
        {"Data": json.dumps(x).encode(), "PartitionKey": f"{x['run_id']}-{x['rank']}"}
        for x in recs])
    assert out["FailedRecordCount"] == 0
    assert objects(aws, ep.bucket) == []  # buffered, not written per put (unlike DirectPut)
    got = delivered(aws, ep.bucket, "telemetry/run_id=run-a/", 3)
    assert sorted(r["rank"] for r in got) == [0, 1, 2] and {r["run_id"] for r in got} == {"run-a"}
    keys = objects(aws, ep.bucket, "telemetry/run_id=run-b/")
    assert keys and all(k.endswith(".gz") and f"/{cfg.delivery_stream}-1-" in k for k in keys)
    body = gzip.decompress(aws.client("s3").get_object(Bucket=ep.bucket, Key=keys[0])[
        "Body"].read())
    assert body.endswith(b"\n") and len(body.splitlines()) == 3  # AppendDelimiterToRecord


def test_a_record_without_the_partition_key_goes_to_the_error_prefix(aws):
    _, ep = fresh(aws)
    aws.client("kinesis").put_record(StreamName=ep.stream, Data=b"not json", PartitionKey="x")
    deadline = time.monotonic() + 15
    while not objects(aws, ep.bucket, "telemetry-errors/processing-failed/"):
        assert time.monotonic() < deadline, objects(aws, ep.bucket)
        time.sleep(0.3)
    assert objects(aws, ep.bucket, "telemetry/run_id=") == []


def test_api_gateway_stage_puts_records_on_the_stream_and_s3(aws):
    _, ep = fresh(aws)
    url = f"{ep.stage_url}/runs/run-api/records"
    body = json.dumps({"records": [{"run_id": "run-api", "rank": r, "kind": "step", "step": 2}
                                   for r in range(2)]}).encode()
    status, out = _post(url, body, ep.api_key)
    assert status == 200 and out["FailedRecordCount"] == 0, out
    shard = aws.client("kinesis").list_shards(StreamName=ep.stream)["Shards"][0]["ShardId"]
    it = aws.client("kinesis").get_shard_iterator(StreamName=ep.stream, ShardId=shard,
                                                  ShardIteratorType="TRIM_HORIZON")
    recs = aws.client("kinesis").get_records(ShardIterator=it["ShardIterator"])["Records"]
    assert sorted(r["PartitionKey"] for r in recs) == ["run-api-0", "run-api-1"]
    assert [r["rank"] for r in delivered(aws, ep.bucket, "telemetry/run_id=run-api/", 2)]


def test_the_real_invoke_host_form_is_served_too(aws, moto_server):
    _, ep = fresh(aws)
    body = json.dumps({"records": [{"run_id": "host-form", "rank": 0}]}).encode()
    req = urllib.request.Request(
        f"{moto_server.url}/{ep.stage}/runs/host-form/records", data=body, method="POST",
        headers={"Content-Type": "application/json", "x-api-key": ep.api_key,
                 "Host": f"{ep.api_id}.execute-api.us-east-1.amazonaws.com"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["FailedRecordCount"] == 0


@pytest.mark.parametrize(("body", "reason"), [
    (b"{not json", "body is not JSON"),
    (json.dumps({"records": []}).encode(), "records"),
    (json.dumps({"records": [{"rank": 0}]}).encode(), "run_id"),
    (json.dumps({"records": [{"run_id": "r", "rank": 0, "blob": "x" * (1024 * 1024)}]}
                ).encode(), "1048576"),
])
def test_bad_input_is_a_4xx_with_the_reason_and_nothing_is_written(aws, body, reason):
    _, ep = fresh(aws)
    status, out = _post(f"{ep.stage_url}/runs/r/records", body, ep.api_key)
    assert status == 400, out
    assert reason in json.dumps(out)
    shard = aws.client("kinesis").list_shards(StreamName=ep.stream)["Shards"][0]["ShardId"]
    it = aws.client("kinesis").get_shard_iterator(StreamName=ep.stream, ShardId=shard,
                                                  ShardIteratorType="TRIM_HORIZON")
    assert aws.client("kinesis").get_records(ShardIterator=it["ShardIterator"])["Records"] == []


def test_api_key_is_required_and_unknown_paths_are_refused(aws):
    _, ep = fresh(aws)
    body = json.dumps({"records": [{"run_id": "r", "rank": 0}]}).encode()
    assert _post(f"{ep.stage_url}/runs/r/records", body, None) == (403, {"message": "Forbidden"})
    assert _post(f"{ep.stage_url}/runs/r/records", body, "wrong")[0] == 403
    assert _post(f"{ep.stage_url}/nope", body, ep.api_key) == (
        403, {"message": "Missing Authentication Token"})


def test_usage_plan_throttles_with_429(aws):
    _, ep = fresh(aws, rate_limit=1.0, burst_limit=2)
    body = json.dumps({"records": [{"run_id": "r", "rank": 0}]}).encode()
    statuses = [_post(f"{ep.stage_url}/runs/r/records", body, ep.api_key)[0] for _ in range(5)]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:], statuses
