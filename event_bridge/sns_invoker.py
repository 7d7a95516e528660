"""A handler subscribed to an SNS topic, invoked the way Lambda invokes it: asynchronously.

SNS hands a message to Lambda and is done; Lambda queues the invocation, retries a failed
one (twice, so ``max_attempts`` 3) after a delay, and when the retries are spent sends a
record of the event and the error to the function's on-failure destination (an SQS queue).

Locally the subscription is an SNS ``http`` subscription to a small server on 127.0.0.1: the
embedded endpoint POSTs each notification there, the server queues it and answers at once
(SNS must not wait on the handler), and a worker thread invokes the handler with those
retries and that on-failure record. On AWS deploy the same handler as a Lambda function
subscribed to the topic, with the same queue as its on-failure destination; AWS cannot reach
127.0.0.1, so this refuses to subscribe there.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

from event_bridge.lambda_shapes import Handler, new_context, on_failure_record, sns_event
from infra.aws.clients import AwsTarget

log = logging.getLogger(__name__)


class LocalOnly(RuntimeError):
    """An SNS consumer was asked to subscribe a local endpoint to a topic on AWS."""


@dataclass
class InvokerStats:
    notifications: int = 0
    invocations: int = 0
    succeeded: int = 0
    retried: int = 0
    sent_to_on_failure: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class SnsInvoker:
    def __init__(self, aws: AwsTarget, topic_arn: str, handler: Handler, *, name: str,
                 on_failure_queue_url: str | None = None, max_attempts: int = 3,
                 retry_delays_s: tuple[float, ...] = (1.0, 2.0),
                 filter_policy: dict[str, Any] | None = None, timeout_s: float = 300.0,
                 dedup_table: str | None = None) -> None:
        if aws.endpoint_url is None:
            raise LocalOnly(
                f"consumer {name}: a topic consumer runs here only against a local endpoint; "
                "on AWS deploy its handler as a Lambda function subscribed to the topic with "
                "the on-failure queue as its destination")
        self.aws, self.topic_arn, self.handler, self.name = aws, topic_arn, handler, name
        self.on_failure_queue_url = on_failure_queue_url
        self.max_attempts = max_attempts
        self.retry_delays_s = retry_delays_s
        self.filter_policy = filter_policy
        self.timeout_s = timeout_s
        self.dedup_table = dedup_table
        self.stats = InvokerStats()
        self.subscription_arn: str | None = None
        self._pending: queue.Queue[tuple[dict[str, Any], str]] = queue.Queue()
        self._outstanding = 0  # received and not yet finished (queued or running)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._request_handler())
        self._threads = [
            threading.Thread(target=self._server.serve_forever, daemon=True,
                             name=f"sns-{name}-http"),
            threading.Thread(target=self._work, daemon=True, name=f"sns-{name}-worker"),
        ]

    @property
    def url(self) -> str:
        # The path names the consumer, so a later start can find its predecessor's endpoint.
        return f"http://127.0.0.1:{self._server.server_address[1]}/{quote(self.name, safe='')}"

    def start(self) -> SnsInvoker:
        for t in self._threads:
            t.start()
        sns = self.aws.client("sns")
        self._remove_stale_subscriptions(sns)
        attrs = {}
        if self.filter_policy is not None:
            attrs = {"FilterPolicy": json.dumps(self.filter_policy),
                     "FilterPolicyScope": "MessageBody"}
        self.subscription_arn = sns.subscribe(
            TopicArn=self.topic_arn, Protocol="http", Endpoint=self.url, Attributes=attrs,
            ReturnSubscriptionArn=True)["SubscriptionArn"]
        return self

    def _remove_stale_subscriptions(self, sns: Any) -> None:
        """Endpoints a killed predecessor of this consumer left on the topic."""
        pattern = re.compile(rf"^http://127\.0\.0\.1:\d+/{re.escape(quote(self.name, safe=''))}$")
        for page in sns.get_paginator("list_subscriptions_by_topic").paginate(
                TopicArn=self.topic_arn):
            for sub in page["Subscriptions"]:
                if (sub["Protocol"] == "http" and pattern.match(sub["Endpoint"])
                        and sub["SubscriptionArn"].startswith("arn:")):
                    sns.unsubscribe(SubscriptionArn=sub["SubscriptionArn"])
                    log.info("%s: removed the stale endpoint %s", self.name, sub["Endpoint"])

    def stop(self, drain_timeout_s: float = 30.0) -> InvokerStats:
        """Unsubscribe (no stale endpoint left on the topic), finish queued work, stop."""
        if self.subscription_arn and self.subscription_arn.startswith("arn:"):
            self.aws.client("sns").unsubscribe(SubscriptionArn=self.subscription_arn)
        self.wait_idle(drain_timeout_s)
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        return self.stats

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._outstanding == 0:
                    return True
            time.sleep(0.05)
        return False

    def _request_handler(self) -> type[BaseHTTPRequestHandler]:
        invoker = self

        class Endpoint(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                try:
                    envelope = json.loads(self.rfile.read(length))
                except ValueError:
                    self.send_response(400)
                    self.end_headers()
                    return
                kind = self.headers.get("x-amz-sns-message-type") or envelope.get("Type")
                if kind == "SubscriptionConfirmation" and envelope.get("SubscribeURL"):
                    with urllib.request.urlopen(envelope["SubscribeURL"], timeout=10):
                        pass
                elif kind == "Notification":
                    sub = (self.headers.get("x-amz-sns-subscription-arn")
                           or invoker.subscription_arn or "")
                    with invoker._lock:
                        invoker.stats.notifications += 1
                        invoker._outstanding += 1
                        invoker._pending.put((envelope, sub))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Endpoint

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                envelope, sub = self._pending.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._invoke(sns_event(envelope, sub))
            except Exception:  # noqa: BLE001 - e.g. the on-failure queue is unreachable
                log.exception("%s: could not finish an invocation", self.name)
            finally:
                with self._lock:
                    self._outstanding -= 1

    def _invoke(self, event: dict[str, Any]) -> None:
        context = new_context(self.name, self.aws.region, self.timeout_s, self.aws,
                              self.dedup_table)
        error: BaseException | None = None
        for attempt in range(1, self.max_attempts + 1):
            self.stats.invocations += 1
            try:
                self.handler(event, context)
                self.stats.succeeded += 1
                return
            except Exception as e:  # noqa: BLE001 - Lambda retries any function error
                error = e
                log.warning("%s: attempt %d/%d failed: %s: %s", self.name, attempt,
                            self.max_attempts, type(e).__name__, e)
            if attempt < self.max_attempts:
                self.stats.retried += 1
                delays = self.retry_delays_s or (0.0,)
                if self._stop.wait(delays[min(attempt - 1, len(delays) - 1)]):
                    break
        assert error is not None
        record = on_failure_record(event, context, attempt, error)
        if self.on_failure_queue_url is None:
            log.error("%s: retries exhausted and no on-failure queue: %s", self.name,
                      json.dumps(record)[:2000])
            return
        self.aws.client("sqs").send_message(QueueUrl=self.on_failure_queue_url,
                                            MessageBody=json.dumps(record))
        self.stats.sent_to_on_failure += 1
