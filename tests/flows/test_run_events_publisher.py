"""Per-point run events leave from a background thread, in order, and failures still surface."""

from __future__ import annotations

import socket
import uuid

import pytest

from flows.steps.flow import RUN_EVENTS_TOPIC, RunEventsPublisher
from flows.steps.graph import Point
from infra.aws.clients import AwsTarget
from tests.flows.test_steps_run import _run_events, _run_events_queue


def _point(step: str, label: str = "") -> Point:
    return Point(step=step, label=label, params={}, index=0, upstream=())


def test_events_arrive_in_the_order_they_happened(aws: AwsTarget) -> None:
    url = _run_events_queue(aws)
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    publish = RunEventsPublisher(aws, run_id)
    order = [("a", "started"), ("b", "started"), ("a", "succeeded"), ("b", "failed")]
    for step, stage in order:
        publish(_point(step), stage, {"job_id": "7"} if stage == "started" else {})
    publish.close()  # returns once every event is out
    got = _run_events(aws, url, run_id)
    assert got == [f"step:{step}:{stage}" for step, stage in order]


def test_a_publish_failure_fails_the_close_naming_the_topic() -> None:
    with socket.socket() as s:  # an endpoint nobody answers on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    publish = RunEventsPublisher(AwsTarget(region="us-east-1", endpoint_url=dead,
                                           embedded=True), "run-x")
    publish(_point("a"), "started", {})
    publish(_point("a"), "succeeded", {})
    with pytest.raises(RuntimeError, match=RUN_EVENTS_TOPIC):
        publish.close()
