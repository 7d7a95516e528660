"""The stager inside a Batch job, against the embedded endpoint: verified down, summed up."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from infra.staging.fsx_job import SUMS
from infra.staging.locations import IntegrityError
from infra.staging.s3_job import STAGE_IN, STAGE_OUT, main, stage_in, stage_out


def _bucket(aws) -> str:
    name = f"s3job-{uuid.uuid4().hex[:8]}"
    aws.client("s3").create_bucket(Bucket=name)
    return name


def test_inputs_down_verified_and_results_up_with_their_sums(aws, tmp_path, monkeypatch):
    bucket = _bucket(aws)
    s3 = aws.client("s3")
    body = b"initial field"
    s3.put_object(Bucket=bucket, Key="in/a.npy", Body=body, ChecksumAlgorithm="SHA256")
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.endpoint_url)
    monkeypatch.setenv(STAGE_IN, json.dumps([{"uri": f"s3://{bucket}/in/a.npy",
                                              "path": str(tmp_path / "node/in/a.npy")}]))
    assert main(["in"]) == 0
    assert (tmp_path / "node/in/a.npy").read_bytes() == body

    out = tmp_path / "node/out"
    out.mkdir()
    (out / "field.npy").write_bytes(b"result")
    (out / "manifest.json").write_text(json.dumps({"files": [
        {"name": "field.npy", "sha256": hashlib.sha256(b"result").hexdigest()}]}))
    monkeypatch.setenv(STAGE_OUT, json.dumps({"dir": str(out), "bucket": bucket,
                                              "prefix": "runs/r1/"}))
    assert main(["out"]) == 0
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/r1/")["Contents"]}
    assert keys == {"runs/r1/field.npy", f"runs/r1/{SUMS}"}  # never the manifest itself
    sums = json.loads(s3.get_object(Bucket=bucket, Key=f"runs/r1/{SUMS}")["Body"].read())
    assert sums["sha256"] == {"field.npy": hashlib.sha256(b"result").hexdigest()}
    assert main(["sideways"]) == 2


def test_a_corrupt_input_or_a_changed_result_stops_the_job(aws, tmp_path):
    from infra.aws.clients import AwsTarget

    bucket = _bucket(aws)
    aws.client("s3").put_object(Bucket=bucket, Key="in/b.npy", Body=b"bytes",
                                Metadata={"sha256": "0" * 64})
    target = AwsTarget(region="us-east-1", endpoint_url=aws.endpoint_url)
    with pytest.raises(IntegrityError, match="downloaded SHA-256"):
        stage_in(target, [{"uri": f"s3://{bucket}/in/b.npy", "path": str(tmp_path / "b")}])
    assert not (tmp_path / "b").exists()
    out = tmp_path / "out"
    out.mkdir()
    (out / "field.npy").write_bytes(b"changed after the manifest")
    (out / "manifest.json").write_text(json.dumps({"files": [
        {"name": "field.npy", "sha256": hashlib.sha256(b"result").hexdigest()}]}))
    with pytest.raises(SystemExit, match="not the manifest's"):
        stage_out(target, out, bucket, "runs/r2/")
    listing = aws.client("s3").list_objects_v2(Bucket=bucket, Prefix="runs/r2/")
    assert listing.get("Contents", []) == []  # nothing was sent
