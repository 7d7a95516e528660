"""Run Lambda-signature handlers on SQS queues with Lambda's event-source semantics.

What Lambda's SQS event source mapping does, and this does too:

* receives batches (up to ``batch_size``) and invokes the handler once per batch;
* reads the handler's partial batch response: only the reported messages are retried, the
  rest are deleted; an exception (or an invalid response) retries the whole batch;
* keeps the batch invisible while the handler works, extending the visibility timeout from a
  heartbeat thread, so a long handler is not raced by a second delivery;
* on a FIFO queue never lets a message overtake a failed one of its group;
* leaves retries and dead-lettering to SQS: a failed message comes back after its visibility
  timeout and after ``maxReceiveCount`` receives SQS moves it to the DLQ.

FIFO queues are read one message per receive unless a batch size is given. SQS hands out a
group's next message only when the previous one is done, so a failing message blocks its
group (and only its group) until it succeeds or SQS dead-letters it, and no message pays for
a neighbour's failure. With bigger batches (Lambda's way) the messages held back behind a
failure are received again with it and spend their receive counts too, so they can end in
the DLQ beside it.

One deliberate difference: a failed message's visibility is set to a short backoff (1 s, 2 s,
4 s ... capped) instead of waiting out the full timeout (300 s), and to 0 after its last
allowed receive so SQS dead-letters it at once. That is what lets ``drain`` finish with every
poison message in a DLQ in seconds rather than 15 minutes.

Stopping: ``SqsEventSource.stop()`` (on SIGINT/SIGTERM) makes the batch in hand visible again
at once instead of after its visibility timeout, so the next ``drain`` does not sit waiting
for messages a stopped consumer held; ``drain`` says what it waits for while it waits.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from event_bridge.lambda_shapes import Handler, failed_ids, new_context, sqs_record
from infra.aws.clients import AwsTarget

log = logging.getLogger(__name__)


class HandlerImportError(ImportError):
    """A consumer names a handler that cannot be imported."""


def load_handler(path: str) -> Handler:
    """``package.module:function`` -> the function (Lambda's ``module.function`` notation)."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise HandlerImportError(f"handler {path}: cannot import {module_name}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise HandlerImportError(f"handler {path}: {module_name} has no callable {attr!r}")
    return fn


@dataclass(frozen=True)
class Backoff:
    """Visibility (s) given to a failed message before its next try; 0 after the last one."""

    base_s: int = 1
    factor: float = 2.0
    max_s: int = 30

    def delay(self, receive_count: int, max_receive_count: int | None) -> int:
        if max_receive_count is not None and receive_count >= max_receive_count:
            return 0
        return int(min(self.max_s, self.base_s * self.factor ** max(0, receive_count - 1)))


@dataclass
class QueueStats:
    queue: str
    received: int = 0
    processed: int = 0
    failed: int = 0
    sent_to_dlq: int = 0
    batches: int = 0
    handler_errors: int = 0
    dlq_depth: int | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("queue")
        d["errors"] = self.errors[-5:]  # the last few, to act on; the logs have all
        return d


@dataclass(frozen=True)
class QueueInfo:
    url: str
    arn: str
    visibility_timeout: int
    max_receive_count: int | None
    fifo: bool
    dlq_url: str | None

    @classmethod
    def read(cls, sqs: Any, url: str) -> QueueInfo:
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        redrive = attrs.get("RedrivePolicy")
        max_rc = dlq_url = None
        if redrive:
            policy = json.loads(redrive)
            max_rc = int(policy["maxReceiveCount"])
            dlq_name = policy["deadLetterTargetArn"].rsplit(":", 1)[-1]
            try:
                dlq_url = sqs.get_queue_url(QueueName=dlq_name)["QueueUrl"]
            except ClientError:
                dlq_url = None
        return cls(url=url, arn=attrs["QueueArn"],
                   visibility_timeout=int(attrs.get("VisibilityTimeout", 30)),
                   max_receive_count=max_rc, fifo=attrs.get("FifoQueue") == "true",
                   dlq_url=dlq_url)


class _Heartbeat:
    """Keeps a batch invisible while the handler works on it."""

    def __init__(self, sqs: Any, url: str, messages: list[dict[str, Any]], visibility: int,
                 every_s: float) -> None:
        self._sqs, self._url, self._visibility = sqs, url, visibility
        self._entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"],
                          "VisibilityTimeout": visibility} for i, m in enumerate(messages)]
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sqs-heartbeat")
        self.beats = 0

    def __enter__(self) -> _Heartbeat:
        if self._every > 0 and self._entries:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            for i in range(0, len(self._entries), 10):
                try:
                    self._sqs.change_message_visibility_batch(
                        QueueUrl=self._url, Entries=self._entries[i:i + 10])
                except ClientError as e:  # the handler's result decides; just report it
                    log.warning("visibility heartbeat on %s failed: %s", self._url, e)
            self.beats += 1


class SqsEventSource:
    """One queue feeding one handler, as a Lambda event source mapping would."""

    def __init__(self, aws: AwsTarget, queue_url: str, handler: Handler, *, name: str,
                 batch_size: int | None = None, backoff: Backoff | None = None,
                 heartbeat_s: float | None = None, dedup_table: str | None = None) -> None:
        self.aws = aws
        self.sqs = aws.client("sqs")
        self.info = QueueInfo.read(self.sqs, queue_url)
        self.handler = handler
        self.name = name
        self.batch_size = batch_size or (1 if self.info.fifo else 10)
        self.backoff = backoff or Backoff()
        vis = self.info.visibility_timeout
        # Extend well before expiry: a third of the timeout, at least every 100 ms.
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.1, vis / 3)
        self.dedup_table = dedup_table
        self.stats = QueueStats(queue=name)
        self._stopping = threading.Event()
        self._in_hand: list[dict[str, Any]] = []
        self._hand_lock = threading.Lock()

    def stop(self) -> int:
        """Take no more messages and make the ones in hand visible again; how many."""
        with self._hand_lock:
            self._stopping.set()
            held, self._in_hand = self._in_hand, []
        self._make_visible(held)
        return len(held)

    def _make_visible(self, messages: list[dict[str, Any]]) -> None:
        for i in range(0, len(messages), 10):
            chunk = messages[i:i + 10]
            try:
                self.sqs.change_message_visibility_batch(QueueUrl=self.info.url, Entries=[
                    {"Id": str(j), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                    for j, m in enumerate(chunk)])
            except ClientError as e:  # stopping anyway: they come back after their timeout
                log.warning("%s: could not hand back %d message(s): %s", self.name,
                            len(chunk), e)

    def poll_once(self, wait_time_s: int = 1) -> int:
        """Receive one batch, run the handler, settle every message; returns the batch size."""
        resp = self.sqs.receive_message(
            QueueUrl=self.info.url, MaxNumberOfMessages=self.batch_size,
            WaitTimeSeconds=wait_time_s, MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"])
        messages = resp.get("Messages", [])
        if not messages:
            return 0
        with self._hand_lock:
            stopping = self._stopping.is_set()
            if not stopping:
                self._in_hand = list(messages)
        if stopping:  # received while stopping: hand them straight back
            self._make_visible(messages)
            return 0
        self.stats.received += len(messages)
        self.stats.batches += 1
        records = [sqs_record(m, self.info.arn, self.aws.region) for m in messages]
        context = new_context(self.name, self.aws.region, float(self.info.visibility_timeout),
                              self.aws, self.dedup_table)
        ids = [m["MessageId"] for m in messages]
        with _Heartbeat(self.sqs, self.info.url, messages, self.info.visibility_timeout,
                        self.heartbeat_s if self.info.visibility_timeout > 0 else 0):
            try:
                response = self.handler({"Records": records}, context)
                failed = failed_ids(response, ids)
                if failed is None:
                    self._error(f"invalid partial batch response {response!r:.200}")
            except Exception as e:  # noqa: BLE001 - Lambda: an exception fails the batch
                self._error(f"{type(e).__name__}: {e}")
                failed = None
        failed = set(ids) if failed is None else failed
        if self.info.fifo:
            failed = self._hold_groups(messages, failed)
        with self._hand_lock:
            if not self._in_hand:  # stop() handed them back meanwhile: theirs to settle now
                return len(messages)
            self._in_hand = []
        self._settle(messages, failed)
        return len(messages)

    def _error(self, text: str) -> None:
        self.stats.handler_errors += 1
        self.stats.errors.append(text)
        log.warning("%s: handler failed the whole batch: %s", self.name, text)

    @staticmethod
    def _hold_groups(messages: list[dict[str, Any]], failed: set[str]) -> set[str]:
        """A message after a failed one in its group must not be acknowledged (FIFO order)."""
        held = set(failed)
        broken: set[str] = set()
        for m in messages:
            group = m.get("Attributes", {}).get("MessageGroupId")
            if m["MessageId"] in failed:
                broken.add(group)
            elif group in broken:
                held.add(m["MessageId"])
        return held

    def _settle(self, messages: list[dict[str, Any]], failed: set[str]) -> None:
        done = [m for m in messages if m["MessageId"] not in failed]
        for i in range(0, len(done), 10):
            chunk = done[i:i + 10]
            resp = self.sqs.delete_message_batch(QueueUrl=self.info.url, Entries=[
                {"Id": str(j), "ReceiptHandle": m["ReceiptHandle"]} for j, m in enumerate(chunk)])
            for f in resp.get("Failed", []):
                # The receipt expired (the batch outlived its visibility): it will come back
                # and the dedup store makes the second run a no-op.
                log.warning("%s: could not delete message %s: %s", self.name,
                            chunk[int(f["Id"])]["MessageId"], f.get("Message"))
            self.stats.processed += len(chunk) - len(resp.get("Failed", []))
        retry = []
        for m in messages:
            if m["MessageId"] not in failed:
                continue
            count = int(m.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            self.stats.failed += 1
            if self.info.max_receive_count is not None and count >= self.info.max_receive_count:
                self.stats.sent_to_dlq += 1
                log.warning("%s: message %s failed its last allowed receive (%d); SQS moves "
                            "it to the DLQ", self.name, m["MessageId"], count)
            retry.append((m, self.backoff.delay(count, self.info.max_receive_count)))
        for i in range(0, len(retry), 10):
            chunk = retry[i:i + 10]
            resp = self.sqs.change_message_visibility_batch(QueueUrl=self.info.url, Entries=[
                {"Id": str(j), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": d}
                for j, (m, d) in enumerate(chunk)])
            for f in resp.get("Failed", []):
                log.warning("%s: could not shorten the visibility of %s: %s", self.name,
                            chunk[int(f["Id"])][0]["MessageId"], f.get("Message"))

    def depth(self) -> dict[str, int]:
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.info.url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed"])["Attributes"]
        return {k: int(v) for k, v in attrs.items()}

    def dlq_depth(self) -> int | None:
        if self.info.dlq_url is None:
            return None
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.info.dlq_url, AttributeNames=[
            "ApproximateNumberOfMessages"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"])

    def _waiting_note(self, depth: dict[str, int], waited_s: float, timeout_s: float) -> str:
        in_flight = depth.get("ApproximateNumberOfMessagesNotVisible", 0)
        delayed = depth.get("ApproximateNumberOfMessagesDelayed", 0)
        parts = []
        if in_flight:
            parts.append(f"{in_flight} message(s) in flight, held by another consumer or by "
                         "one that was killed; they come back after the queue's visibility "
                         f"timeout ({self.info.visibility_timeout} s)")
        if delayed:
            parts.append(f"{delayed} delayed message(s)")
        return (f"{self.name}: waiting for {'; '.join(parts) or 'messages'} "
                f"({waited_s:.0f} s of at most {timeout_s:.0f} s)")

    def drain(self, timeout_s: float = 600.0, idle_poll_s: float = 0.2,
              progress_s: float = 10.0) -> QueueStats:
        """Consume until the queue is truly empty: nothing visible, in flight or delayed.

        Messages waiting out a failure backoff count as not empty, so when this returns every
        message was either processed or moved to the DLQ by SQS.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        next_note = t0 + progress_s
        while not self._stopping.is_set():
            if self.poll_once(wait_time_s=0):
                continue
            depth = self.depth()
            if sum(depth.values()) == 0:
                break
            now = time.monotonic()
            if now > deadline:
                self.stats.seconds = round(now - t0, 3)
                raise TimeoutError(
                    f"queue {self.name} still holds {depth} after {timeout_s:.0f} s of "
                    "draining; another consumer may hold messages in flight")
            if now >= next_note:  # never a silent wait: say what is awaited and for how long
                next_note = now + progress_s
                log.info("%s", self._waiting_note(depth, now - t0, timeout_s))
            time.sleep(idle_poll_s)
        self.stats.seconds = round(time.monotonic() - t0, 3)
        self.stats.dlq_depth = self.dlq_depth()
        return self.stats

    def run(self, stop: threading.Event, wait_time_s: int = 20) -> QueueStats:
        """Consume until ``stop`` is set (long polling; a batch in hand is finished first)."""
        while not stop.is_set():
            try:
                self.poll_once(wait_time_s=wait_time_s)
            except ClientError as e:
                log.error("%s: %s; retrying in 5 s", self.name, e)
                stop.wait(5)
        return self.stats


def run_parallel(jobs: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run named callables in threads; returns name -> result or the exception it raised."""
    results: dict[str, Any] = {}

    def call(name: str, fn: Callable[[], Any]) -> None:
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - reported per queue by the caller
            results[name] = e

    threads = [threading.Thread(target=call, args=(n, f), name=f"consumer-{n}", daemon=True)
               for n, f in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
