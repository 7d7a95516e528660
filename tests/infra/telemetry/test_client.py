"""The rank-side client: batching, and dropping (counted) instead of failing or blocking."""

from __future__ import annotations

import socket
import time

from mpi_jobs.telemetry import MAX_RECORDS_PER_CALL, Reporter
from tests.infra.telemetry.support import delivered, fresh


def _dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_kinesis_reporter_batches_within_limits_and_everything_arrives(aws, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # a node's credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    _, ep = fresh(aws)
    rep = Reporter("run-k", 3, stream=ep.stream, endpoint_url=aws.endpoint_url,
                   region=aws.region)
    calls = []
    rep._put_kinesis = (lambda orig: lambda batch: (calls.append(len(batch)), orig(batch)))(
        rep._put_kinesis)
    for i in range(1200):
        rep.report(kind="step", step=i, seconds=0.001)
    counts = rep.close(timeout=30)
    assert counts["sent"] == 1200 and counts["dropped"] == 0, counts
    assert max(calls) <= MAX_RECORDS_PER_CALL and sum(calls) == 1200
    got = delivered(aws, ep.bucket, "telemetry/run_id=run-k/", 1200)
    assert sorted(r["step"] for r in got) == list(range(1200))
    assert {r["rank"] for r in got} == {3} and all(r["host"] for r in got)


def _silent_server() -> socket.socket:
    """A port whose kernel completes the TCP handshake but whose owner never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    return srv


def test_a_hung_endpoint_never_blocks_the_caller(monkeypatch):
    """While the sender waits on an endpoint that never answers, report() still only queues.

    Had report() waited for a send, the loop below would outlast the sender's 120 s timeout
    and the send would be counted as failed before the loop ended.
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for transport in ("apigateway", "kinesis"):
        srv = _silent_server()
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        rep = (Reporter("run-x", 0, url=url, api_key="k", timeout=120) if transport == "apigateway"
               else Reporter("run-x", 0, stream="s", endpoint_url=url, region="us-east-1",
                             timeout=120))
        try:
            for i in range(5000):
                rep.report(kind="step", step=i)
            assert rep.counts["queued"] == 5000
            deadline = time.monotonic() + 60  # the sender reaches the endpoint and hangs there
            while rep._queue.qsize() == 5000 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rep._queue.qsize() < 5000, "the sender never took a batch"
            assert rep.counts["sent"] == 0 and rep.dropped == 0, rep.counts
            assert rep._thread.is_alive()
        finally:
            srv.close()  # resets the pending connection: the hung send fails, and is counted
        counts = rep.close(timeout=30)
        assert counts["sent"] == 0 and counts["dropped"] == 5000, counts
        assert counts["last_error"]


def test_down_endpoint_drops_and_counts(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for rep in (Reporter("run-x", 0, url=_dead_url(), api_key="k"),
                Reporter("run-x", 0, stream="s", endpoint_url=_dead_url(), region="us-east-1")):
        for i in range(5000):
            rep.report(kind="step", step=i)
        counts = rep.close(timeout=10)
        assert counts["sent"] == 0 and counts["dropped"] == 5000, counts
        assert counts["last_error"]


def test_full_queue_drops_and_counts():
    rep = Reporter("run-q", 0, url=_dead_url(), api_key="k", queue_size=10, flush_seconds=30)
    rep._down_until = time.monotonic() + 60  # the sender drops at once: only the queue counts
    for i in range(10_000):
        rep.report(step=i)
    counts = rep.close(timeout=10)
    assert counts["dropped_queue_full"] > 0
    assert counts["dropped"] == 10_000 and counts["sent"] == 0


def test_throttled_api_calls_are_counted_as_throttled(aws):
    _, ep = fresh(aws, rate_limit=0.5, burst_limit=1)
    rep = Reporter("run-t", 0, url=ep.stage_url, api_key=ep.api_key, flush_seconds=0.05,
                   backoff_seconds=0.0)
    for i in range(5):
        rep.report(step=i)
        time.sleep(0.15)
    counts = rep.close()
    assert counts["sent"] >= 1 and counts["dropped_throttled"] >= 1, counts
    assert counts["sent"] + counts["dropped"] == 5


def test_a_users_step_reports_with_the_documented_one_liner(aws, tmp_path):
    import os
    import subprocess
    import sys

    from infra.telemetry.job import telemetry_env

    cfg, ep = fresh(aws)
    env = {**os.environ, **telemetry_env(aws, "user-step", mode="apigateway", cfg=cfg),
           "OMPI_COMM_WORLD_RANK": "5"}
    code = ("from mpi_jobs.telemetry import report\n"
            "for i in range(3): report(kind='user', phase='assemble', item=i)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = delivered(aws, ep.bucket, "telemetry/run_id=user-step/", 3)
    assert sorted(r["item"] for r in got) == [0, 1, 2] and {r["rank"] for r in got} == {5}
