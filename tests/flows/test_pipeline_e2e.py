"""The whole pipeline through the real CLI: moto server, mpiexec ranks, Prefect server."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import yaml

from flows.spec import DEFAULT_SPEC
from infra.aws.clients import AwsTarget
from infra.staging.objects import sha256_file
from mpi_jobs.heat import reference_solution
from mpi_jobs.initial_conditions import heat_hotspots
from tests.aws_lists import rule_names
from tests.conftest import run_cli


def _spec(tmp_path: Path, **changes: object) -> Path:
    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    spec["kernel"]["parameters"] = {"nx": 45, "ny": 31, "steps": 25, "alpha": 0.2}
    for key, value in changes.items():
        spec[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _bucket_names(aws: AwsTarget) -> set[str]:
    return {b["Name"] for b in aws.client("s3").list_buckets()["Buckets"]}


def test_pipeline_end_to_end_against_endpoint(aws, cli_env, tmp_path):
    spec = _spec(tmp_path, storage={
        "input_bucket": "e2e-inputs", "results_bucket": "e2e-results",
        "input_prefix": "inputs/", "results_prefix": "runs/"})
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    results = []
    for _ in range(2):  # twice: everything it creates must be created idempotently
        proc = run_cli(["run", "--spec", str(spec), "--json"], cli_env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        results.append(json.loads(proc.stdout))
    first, second = results
    assert first["run_id"] != second["run_id"]
    assert first["backend"] == "local" and first["ranks"] == 2
    assert set(first["seconds"]) == {"provision", "stage_in", "mpi_run", "publish", "consume"}
    assert aws.endpoint_url in first["aws"]

    # The published field is the physics, bit for bit, and identical across the two runs.
    u0 = heat_hotspots(31, 45)
    expected = reference_solution(u0, 25, 0.2)
    s3 = aws.client("s3")
    key = urlparse(first["s3"]["results"]).path.lstrip("/") + "field.npy"
    local = tmp_path / "field.npy"
    s3.download_file("e2e-results", key, str(local))
    assert np.array_equal(np.load(local), expected)
    assert sha256_file(local) == first["field_sha256"] == second["field_sha256"]
    assert first["bytes_staged"] == u0.nbytes + 128  # .npy header

    # Fan-out reached every queue once per run, and the consumers acknowledged it.
    for r in results:
        assert {q: v["events_received"] for q, v in r["fanout"]["queues"].items()} == {
            "postprocess": 1, "audit": 1}
    sqs, sns = aws.client("sqs"), aws.client("sns")
    for q in ("postprocess", "audit"):
        url = sqs.get_queue_url(QueueName=q)["QueueUrl"]
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert attrs["ApproximateNumberOfMessages"] == "0"
        assert json.loads(attrs["RedrivePolicy"])["deadLetterTargetArn"].endswith(f"{q}-dlq")
    subs = sns.list_subscriptions_by_topic(TopicArn=first["fanout"]["topic"])["Subscriptions"]
    assert len(subs) == 2
    rules = rule_names(aws)
    assert rules.count("clusterflow-results-e2e-results-manifest-json") == 1
    listed = s3.list_objects_v2(Bucket="e2e-results", Prefix="runs/")["Contents"]
    assert len(listed) == 4  # field.npy + manifest.json, per run


def test_embedded_endpoint_is_started_and_stopped(cli_env, tmp_path):
    spec = _spec(tmp_path, ranks=3)
    proc = run_cli(["run", "--spec", str(spec), "--json"], cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["aws"].startswith("embedded AWS (moto) at http://127.0.0.1:")
    assert result["ranks"] == 3
    expected = reference_solution(heat_hotspots(31, 45), 25, 0.2)
    field = Path(result["scratch_dir"]) / "out" / "field.npy"
    assert np.array_equal(np.load(field), expected)
    port = urlparse(result["aws"].split(" at ")[1]).port
    with socket.socket() as s:  # the run's own moto server is gone afterwards
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_failing_rank_fails_the_run_with_its_message(aws, cli_env, tmp_path):
    spec = _spec(tmp_path, storage={
        "input_bucket": "fail-inputs", "results_bucket": "fail-results"})
    cli_env.update(AWS_ENDPOINT_URL=aws.endpoint_url, CLUSTERFLOW_HEAT_FAIL_RANK="1")
    proc = run_cli(["run", "--spec", str(spec), "--json"], cli_env, tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "MpiJobFailed" in proc.stderr
    assert "rank 1" in proc.stderr and "injected failure" in proc.stderr
    # Nothing was published for a failed run.
    assert "Contents" not in aws.client("s3").list_objects_v2(Bucket="fail-results")


def test_bad_spec_is_refused_before_anything_is_created(aws, cli_env, tmp_path):
    spec = _spec(tmp_path, storage={
        "input_bucket": "never-created-in", "results_bucket": "never-created-out"},
        ranks=0, colour="blue")
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    before = _bucket_names(aws)
    proc = run_cli(["run", "--spec", str(spec)], cli_env, tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "ranks" in proc.stderr and "colour" in proc.stderr
    assert _bucket_names(aws) == before
    assert not (tmp_path / ".clusterflow").exists()
