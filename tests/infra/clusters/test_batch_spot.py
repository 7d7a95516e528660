"""AWS Batch: retry only when the instance went away, bounded, and counted from the attempts.

The job definition clusterflow registers carries ``retryStrategy`` with ``evaluateOnExit``
(``Host EC2*`` -> RETRY, anything else -> EXIT) and ``attempts = 1 + max_interruptions``;
checked in the request the embedded endpoint receives and in what it stores. moto never
reclaims an instance, so the attempts of a reclaimed job are stubbed (botocore Stubber, in
the shape ``describe_jobs`` returns) to check the count and the compute time lost.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber

from infra.aws.clients import AwsTarget
from infra.backends.providers.base import JobHandle, JobState
from infra.backends.providers.batch import BatchProvider
from infra.backends.providers.spot import batch_interruptions
from infra.clusters import batch
from infra.clusters.batch_config import validate_batch_config
from infra.clusters.config_issues import ConfigInvalid
from tests.infra.clusters.test_batch import network, raw_config, start_server

RETRY = [{"onStatusReason": "Host EC2*", "action": "RETRY"},
         {"onReason": "*", "action": "EXIT"}]


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsTarget]:
    server = start_server(tmp_path_factory.mktemp("moto-batch-spot") / "moto.log")
    yield AwsTarget(region="us-east-1", endpoint_url=server.url, embedded=True)
    server.stop()


def test_the_registered_job_definition_retries_host_loss_only(aws: AwsTarget) -> None:
    cfg = validate_batch_config(raw_config(network(aws), max_interruptions=2))
    sent: list[dict[str, Any]] = []

    def capture(params: dict[str, Any], **_: Any) -> None:
        sent.append(json.loads(json.dumps(params)))

    client = aws.client("batch")
    client.meta.events.register("provide-client-params.batch.RegisterJobDefinition", capture)
    try:
        env = batch.ensure_environment(aws, cfg)
    finally:
        client.meta.events.unregister("provide-client-params.batch.RegisterJobDefinition",
                                      capture)
    assert [s["retryStrategy"] for s in sent] == [{"attempts": 3, "evaluateOnExit": RETRY}]
    stored = client.describe_job_definitions(jobDefinitions=[env.job_definition_arn])[
        "jobDefinitions"][0]["retryStrategy"]
    # moto (like Batch) hands the actions back lower-case
    assert stored["attempts"] == 3
    assert [{k: v.upper() if k == "action" else v for k, v in r.items()}
            for r in stored["evaluateOnExit"]] == RETRY


def test_attempts_is_the_older_spelling_and_cannot_be_mixed(aws: AwsTarget) -> None:
    net = network(aws)
    assert validate_batch_config(raw_config(net)).interruptions_allowed == 1  # shipped c5n
    old = validate_batch_config({k: v for k, v in raw_config(net, attempts=3).items()
                                 if k != "max_interruptions"})
    assert old.interruptions_allowed == 2
    assert batch.job_definition_request(old)["retryStrategy"] == {"attempts": 3,
                                                                  "evaluateOnExit": RETRY}
    with pytest.raises(ConfigInvalid, match="attempts and max_interruptions both bound"):
        validate_batch_config(raw_config(net, attempts=2, max_interruptions=1))


def _attempt(reason: str, started: int, stopped: int, code: int | None) -> dict[str, Any]:
    container: dict[str, Any] = {"logStreamName": "", "networkInterfaces": []}
    if code is not None:
        container["exitCode"] = code
    return {"container": container, "startedAt": started, "stoppedAt": stopped,
            "statusReason": reason}


RECLAIMED = "Host EC2 (instance i-0a1b2c3d4e5f60718) terminated."
T0 = 1_796_600_000_000  # ms


def _job(status: str, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"jobName": "heat-run-1", "jobId": "8e4f5a1c-0d2b-4c8e-9f3a-1b2c3d4e5f60",
            "jobQueue": "arn:aws:batch:us-east-1:123456789012:job-queue/q",
            "status": status, "attempts": attempts, "createdAt": T0 - 60_000,
            "startedAt": attempts[-1]["startedAt"], "jobDefinition": "arn:jd",
            "nodeProperties": {"numNodes": 3, "mainNode": 0, "nodeRangeProperties": []}}


def test_the_summary_counts_interruptions_from_the_jobs_attempts(tmp_path: Path) -> None:
    """Two reclaims (1,200 s and 300 s of compute lost), then a run to the end."""
    job = _job("SUCCEEDED", [
        _attempt(RECLAIMED, T0, T0 + 1_200_000, None),
        _attempt(RECLAIMED, T0 + 1_500_000, T0 + 1_800_000, None),
        _attempt("Essential container in task exited", T0 + 2_000_000, T0 + 5_600_000, 0)])
    target = AwsTarget(region="us-east-1", endpoint_url="http://127.0.0.1:9")
    client = target.client("batch")
    with Stubber(client) as stub:
        stub.add_response("describe_jobs", {"jobs": [job]}, {"jobs": [job["jobId"]]})
        stub.add_response("describe_jobs", {"jobs": []}, {"jobs": [f"{job['jobId']}#0"]})
        provider = BatchProvider(target, None)  # type: ignore[arg-type]
        handle = JobHandle(job["jobId"], tmp_path / "o", tmp_path / "e")
        assert provider.status(handle).state is JobState.COMPLETED
        lost = provider.interruptions(handle)
        stub.assert_no_pending_responses()  # counted from the status' description
    assert (lost.count, lost.seconds_lost) == (2, 1500.0)
    assert lost.as_dict() == {"interruptions": 2, "seconds_lost": 1500.0}
    # A program that failed is not an interruption, even when retried by hand.
    failed = _job("FAILED", [_attempt("Essential container in task exited", T0, T0 + 5, 1)])
    assert batch_interruptions(failed).count == 0
