"""Issue 13, class 9 (events): no silent waits, claims handed back, a plain moto named.

* ``events drain`` stopped by SIGTERM (or Ctrl-C) hands back the message it held and its
  dedup claim, so the next drain processes it at once instead of after the visibility
  timeout (300 s);
* while a drain waits for messages in flight it says so, and for how long;
* a consume stage whose event never arrives because the endpoint is a plain ``moto_server``
  (no EventBridge -> SNS delivery) says so and names the endpoint to start instead.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from event_bridge.apply import apply_fabric
from event_bridge.consumer import consume_until, plain_moto_hint
from event_bridge.fabric import ConsumerSpec, DedupSpec, Fabric, QueueSpec
from event_bridge.runtime import Backoff, SqsEventSource
from event_bridge.service import drain
from infra.aws.clients import AwsTarget
from infra.aws.embedded import _answers, _free_port
from tests.events_support import COUNTS_ENV, counts, event_body, make_counter_table, tag

REPO = Path(__file__).resolve().parents[2]


def _depths(aws, url: str) -> tuple[int, int]:
    a = aws.client("sqs").get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])


def test_sigterm_hands_back_the_message_and_claim_so_the_next_drain_does_not_wait(
        aws, tmp_path, monkeypatch):
    t = tag()
    table = make_counter_table(aws)
    # Production visibility (300 s): a message kept in flight would block the re-run.
    fabric = Fabric(queues=[QueueSpec(name=f"q-{t}")],
                    consumers=[ConsumerSpec(queue=f"q-{t}",
                                            handler="tests.events_support:count_events")],
                    dedup=DedupSpec(table=f"dedup-{t}"))
    q = apply_fabric(aws, fabric).queues[f"q-{t}"]
    aws.client("sqs").send_message(QueueUrl=q.url, MessageBody=event_body("e1"))
    path = tmp_path / "fabric.yaml"
    path.write_text(yaml.safe_dump(fabric.model_dump(mode="json", exclude_none=True)))
    marker = tmp_path / "hanging"
    env = {**os.environ, "AWS_ENDPOINT_URL": aws.endpoint_url, COUNTS_ENV: table,
           "CLUSTERFLOW_TEST_HANG_ON": "e1", "CLUSTERFLOW_TEST_MARKER": str(marker),
           "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "event_bridge.cli", "drain", "--fabric", str(path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the drain never reached e1"
            time.sleep(0.05)
        # Claimed and in flight for 300 s: what a killed drain used to leave behind.
        items = aws.client("dynamodb").scan(TableName=f"dedup-{t}")["Items"]
        assert [i["status"]["S"] for i in items] == ["IN_PROGRESS"]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    assert "handed back" in stderr and "Traceback" not in stderr
    assert aws.client("dynamodb").scan(TableName=f"dedup-{t}")["Items"] == []
    assert _depths(aws, q.url) == (1, 0)  # visible again at once, not in 300 s

    monkeypatch.setenv(COUNTS_ENV, table)
    summary = drain(aws, fabric, backoff=Backoff(base_s=0), timeout_s=30)
    assert summary["ok"] and summary["processed"] == 1, summary
    assert counts(aws, table) == {"e1": 1}


def test_drain_says_what_it_waits_for(aws, caplog):
    t = tag()
    fabric = Fabric(queues=[QueueSpec(name=f"w-{t}")], dedup=None)
    q = apply_fabric(aws, fabric).queues[f"w-{t}"]
    sqs = aws.client("sqs")
    sqs.send_message(QueueUrl=q.url, MessageBody=event_body("w1"))
    # Another consumer holds it for 3 s (as a killed one would, for its visibility timeout).
    assert sqs.receive_message(QueueUrl=q.url, VisibilityTimeout=3)["Messages"]
    source = SqsEventSource(aws, q.url, lambda event, ctx: {"batchItemFailures": []},
                            name=f"w-{t}")
    with caplog.at_level(logging.INFO, logger="event_bridge.runtime"):
        stats = source.drain(timeout_s=30, progress_s=0.5)
    assert stats.processed == 1
    notes = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert notes, caplog.text
    assert "1 message(s) in flight" in notes[0] and "visibility timeout (300 s)" in notes[0]


@pytest.fixture(scope="module")
def plain_moto(tmp_path_factory) -> AwsTarget:
    """moto's own server, without clusterflow's gap fills (what `moto_server` starts)."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("plain-moto") / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not _answers(url):
        assert proc.poll() is None and time.monotonic() < deadline, "plain moto did not start"
        time.sleep(0.1)
    yield AwsTarget(region="us-east-1", endpoint_url=url, embedded=False)
    proc.terminate()
    proc.wait(timeout=20)


def test_a_plain_moto_server_is_named_at_the_consume_stage(aws, plain_moto):
    assert plain_moto_hint(aws) is None  # clusterflow's own endpoint
    sqs = plain_moto.client("sqs")
    url = sqs.create_queue(QueueName=f"c-{tag()}")["QueueUrl"]
    with pytest.raises(TimeoutError) as e:
        consume_until(plain_moto, "c", url, want_key="runs/r1/manifest.json", timeout_s=2)
    message = str(e.value)
    assert "plain moto_server" in message and "python -m infra.aws.moto_server" in message
    assert plain_moto.endpoint_url in message
    assert "\n" not in message  # one line
