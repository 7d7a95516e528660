"""Build a run's boto3 clients while Prefect creates its flow run.

The first boto3 client of a process loads botocore's session data and the S3 model
(0.13-0.25 s on a busy 2-core VM) and each further service another 10-30 ms; a run's
provision stage paid all of that for s3, sqs, sns and events before its first request.
Meanwhile, the CLI's main thread spends the flow-run creation mostly waiting on the Prefect
server. Clients are cached per ``AwsTarget`` (``infra.aws.clients``) and thread-safe, so a
daemon thread started just before the flow builds them into the same cache, and the stage
finds them built. Only where the run's endpoint is already known: the local stack's
recorded endpoint, ``AWS_ENDPOINT_URL``, or real AWS; never by starting an endpoint.
Best effort: any failure is left for the run itself to meet and report.
"""

from __future__ import annotations

import contextlib
import os
import threading

from flows.spec import PipelineSpec
from infra.aws.clients import AwsTarget

# What provision, stage-in, publish and consume call (event_bridge.topology_cache checks
# queues, the topic, the rule and the bucket's notifications).
SERVICES = ("s3", "sqs", "sns", "events")


def known_target(spec: PipelineSpec) -> AwsTarget | None:
    """The ``AwsTarget`` ``infra.aws.embedded.aws_target`` will yield, if it starts nothing."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    if spec.aws == "real" and endpoint is None:
        return AwsTarget(region=spec.region, endpoint_url=None, embedded=False)
    if endpoint:
        return AwsTarget(region=spec.region, endpoint_url=endpoint, embedded=False)
    from infra.aws.embedded import recorded_server

    url = recorded_server()
    return AwsTarget(region=spec.region, endpoint_url=url, embedded=True) if url else None


def _build(spec: PipelineSpec) -> None:
    with contextlib.suppress(Exception):
        target = known_target(spec)  # may ask the recorded endpoint whether it answers
        if target is not None:
            for service in SERVICES:
                target.client(service)


def start(spec: PipelineSpec) -> threading.Thread:
    """Start building the run's clients in a daemon thread (nothing if the target is unknown)."""
    thread = threading.Thread(target=_build, args=(spec,), name="clusterflow-prewarm",
                              daemon=True)
    thread.start()
    return thread
