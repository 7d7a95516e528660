"""Fan-out benchmark: SNS -> 2 SQS queues -> consumers, batched vs one at a time, and latency.

One moto server (``infra.aws.embedded``, with clusterflow's extensions), one run:

* throughput: a producer publishes N messages to an SNS topic (PublishBatch, 10 a call) that
  fans out to 2 queues; one consumer per queue (``event_bridge.runtime.SqsEventSource``, the
  runtime ``events drain``/``consume`` use) takes them, batch size 10 vs 1, in the same run.
  Twice: end to end (producer and consumers together, as in production; on moto the
  producer tends to be the bottleneck) and consumers only (each round fills the queues
  with ``--round`` messages, then only draining them is timed).
  Reported: deliveries/s (2 per message) until both queues are drained, the ratios, and
  the SQS requests per message (empty receives apart). A third pair runs the consumers-only
  rounds with the idempotent handler (``sqs_batch_handler``: a conditional DynamoDB claim
  and a completion per record) and reports DynamoDB requests per delivery;
* latency: M objects put to S3, one at a time; each "Object Created" event goes S3 ->
  EventBridge rule -> SNS -> both queues -> consumers (long polling). Reported: p50/p99/max of
  put start -> handler call, per queue.

moto's receive cost grows with queue depth (a 10-message receive: ~20 ms at depth 10, ~330 ms
at depth 200), which is why the consumers-only mode works in small rounds: a deep preloaded
queue would measure moto's scans, not the consumers.

    .venv/bin/python bench/fanout.py                                   # full size
    .venv/bin/python bench/fanout.py --messages 200 --latency-samples 30   # smoke

Results go to ``bench/results/fanout.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from event_bridge.apply import apply_fabric  # noqa: E402
from event_bridge.batch import sqs_batch_handler  # noqa: E402
from event_bridge.fabric import (  # noqa: E402
    BucketSpec,
    Fabric,
    QueueSpec,
    RuleSpec,
    SubscriptionSpec,
    TargetSpec,
    TopicSpec,
)
from event_bridge.idempotency import DedupStore  # noqa: E402
from event_bridge.runtime import SqsEventSource  # noqa: E402
from event_bridge.s3_events import parse_s3_events  # noqa: E402
from infra.aws.clients import AwsTarget  # noqa: E402
from infra.aws.embedded import MotoServer  # noqa: E402


def _fabric(tag: str, bucket: str | None = None) -> Fabric:
    queues = [f"a-{tag}", f"b-{tag}"]
    rules = []
    if bucket:
        rules = [RuleSpec(name=f"put-{tag}", pattern={
            "source": ["aws.s3"], "detail-type": ["Object Created"],
            "detail": {"bucket": {"name": [bucket]}}}, targets=[TargetSpec(topic=f"t-{tag}")])]
    return Fabric(
        buckets=[BucketSpec(name=bucket)] if bucket else [],
        queues=[QueueSpec(name=q) for q in queues],
        topics=[TopicSpec(name=f"t-{tag}", subscriptions=[SubscriptionSpec(queue=q)
                                                          for q in queues])],
        rules=rules, dedup=None)


class Counter:
    def __init__(self, target: int) -> None:
        self.n = 0
        self.target = target
        self.lock = threading.Lock()
        self.done = threading.Event()

    def add(self, k: int) -> None:
        with self.lock:
            self.n += k
            if self.n >= self.target:
                self.done.set()


class RequestCounter:
    """Counts the requests a boto3 client sent, by operation (botocore's own events).

    An empty ReceiveMessage (a long poll that found nothing: the consumers' idle polls, one
    per queue at the end of each round) is counted apart from the requests that moved
    messages.
    """

    def __init__(self, client: Any, service: str = "sqs") -> None:
        self.client = client
        self.event = f"after-call.{service}"
        self.by_operation: dict[str, int] = {}
        self.empty_receives = 0
        self._lock = threading.Lock()
        client.meta.events.register(self.event, self._count)

    def _count(self, event_name: str = "", parsed: Any = None, **_: Any) -> None:
        op = event_name.rsplit(".", 1)[-1]
        with self._lock:
            if op == "ReceiveMessage" and not (parsed or {}).get("Messages"):
                self.empty_receives += 1
            else:
                self.by_operation[op] = self.by_operation.get(op, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.by_operation.values())

    def close(self) -> None:
        self.client.meta.events.unregister(self.event, self._count)


def _publish(aws: AwsTarget, topic: str, messages: int) -> None:
    sns = aws.client("sns")
    for i in range(0, messages, 10):
        entries = [{"Id": str(j), "Message": json.dumps({"n": i + j})}
                   for j in range(min(10, messages - i))]
        sns.publish_batch(TopicArn=topic, PublishBatchRequestEntries=entries)


def throughput(aws: AwsTarget, messages: int, batch_size: int, rounds_of: int = 0,
               idempotent: bool = False) -> dict[str, Any]:
    """End to end (``rounds_of`` 0: producer and consumers together), or consumers only:
    queues filled with ``rounds_of`` messages, then drained against the clock, repeated.

    ``idempotent``: the handler is ``sqs_batch_handler`` with its DynamoDB dedup store (each
    record claimed, the batch's completions written together), as the fabric's consumers run.
    """
    tag = uuid.uuid4().hex[:8]
    applied = apply_fabric(aws, _fabric(tag))
    topic = applied.topics[f"t-{tag}"]
    counter = Counter(2 * messages)
    table = None

    def count(event: dict[str, Any], context: Any) -> None:
        counter.add(len(event["Records"]))

    handler: Any = count
    if idempotent:
        table = f"fanout-dedup-{tag}"
        DedupStore(aws, table)  # created before the clock runs
        inner = sqs_batch_handler(lambda record, context: None)

        def handler(event: dict[str, Any], context: Any) -> Any:
            out = inner(event, context)
            count(event, context)
            return out

    sources = [SqsEventSource(aws, ref.url, handler, name=name, batch_size=batch_size,
                              dedup_table=table)
               for name, ref in applied.queues.items()]
    requests = RequestCounter(aws.client("sqs"))
    ddb = RequestCounter(aws.client("dynamodb"), "dynamodb")
    elapsed = produced = 0.0
    chunks = [messages] if not rounds_of else [
        min(rounds_of, messages - i) for i in range(0, messages, rounds_of)]
    for chunk in chunks:
        target = counter.n + 2 * chunk
        stop = threading.Event()
        threads = [threading.Thread(target=s.run, args=(stop, 1), daemon=True) for s in sources]
        if rounds_of:
            _publish(aws, topic, chunk)
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        if not rounds_of:
            _publish(aws, topic, chunk)
            produced = time.perf_counter() - t0
        deadline = time.monotonic() + max(120.0, chunk * 0.2)
        while counter.n < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {counter.n} of {target} deliveries consumed")
            time.sleep(0.005)
        elapsed += time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join()
    requests.close()
    ddb.close()
    return {"batch_size": batch_size, "messages": messages, "deliveries": 2 * messages,
            "seconds": round(elapsed, 3),
            "publish_seconds": None if rounds_of else round(produced, 3),
            "deliveries_per_s": round(2 * messages / elapsed, 1),
            "messages_per_s": round(messages / elapsed, 1),
            "handler_invocations": sum(s.stats.batches for s in sources),
            # receive + delete calls that carried messages, per delivered message: what a
            # batch saves on AWS, whatever this endpoint's speed
            "sqs_calls_per_delivery": round(2 * sum(s.stats.batches for s in sources)
                                            / (2 * messages), 3),
            # every SQS request the consumers sent that moved messages (receives with
            # messages, deletes, visibility changes), per published message (2 deliveries)
            "sqs_requests": dict(sorted(requests.by_operation.items())),
            "sqs_requests_per_message": round(requests.total / messages, 3),
            "empty_receives": requests.empty_receives,
            "dynamodb_requests": dict(sorted(ddb.by_operation.items())),
            "dynamodb_requests_per_delivery": round(ddb.total / (2 * messages), 3)}


def latency(aws: AwsTarget, samples: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    bucket = f"fanout-bench-{tag}"
    applied = apply_fabric(aws, _fabric(tag, bucket))
    started: dict[str, float] = {}
    seen: dict[str, list[float]] = {name: [] for name in applied.queues}
    counter = Counter(2 * samples)

    def handler_for(name: str) -> Any:
        def handler(event: dict[str, Any], context: Any) -> None:
            now = time.perf_counter()
            for record in event["Records"]:
                for obj in parse_s3_events(record["body"]):
                    seen[name].append(now - started[obj.key])
            counter.add(len(event["Records"]))
        return handler

    stop = threading.Event()
    sources = [SqsEventSource(aws, ref.url, handler_for(name), name=name)
               for name, ref in applied.queues.items()]
    threads = [threading.Thread(target=s.run, args=(stop, 5), daemon=True) for s in sources]
    for t in threads:
        t.start()
    s3 = aws.client("s3")
    time.sleep(0.5)  # consumers are long-polling before the first put
    for i in range(samples):
        key = f"runs/r{i}/out.bin"
        started[key] = time.perf_counter()
        s3.put_object(Bucket=bucket, Key=key, Body=b"x" * 1024)
        time.sleep(0.02)
    if not counter.done.wait(timeout=60 + samples):
        raise TimeoutError(f"only {counter.n} of {2 * samples} events consumed")
    stop.set()
    for t in threads:
        t.join()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    out: dict[str, Any] = {"samples": samples}
    for name, values in seen.items():
        ms = [v * 1000 for v in values]
        out[name.split("-")[0]] = {"p50_ms": round(statistics.median(ms), 1),
                                   "p99_ms": round(pct(ms, 0.99), 1),
                                   "max_ms": round(max(ms), 1)}
    everything = [v * 1000 for vs in seen.values() for v in vs]
    out["all"] = {"p50_ms": round(statistics.median(everything), 1),
                  "p99_ms": round(pct(everything, 0.99), 1)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=500, help="messages per throughput mode")
    ap.add_argument("--round", type=int, default=20,
                    help="consumers-only mode: messages queued per round before the clock runs")
    ap.add_argument("--latency-samples", type=int, default=100)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fanout.json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        server = MotoServer(Path(tmp) / "moto.log").start()
        try:
            aws = AwsTarget(region="us-east-1", endpoint_url=server.url, embedded=True)
            kinds = ("end_to_end", "consumers", "idempotent_consumers")
            modes = {(kind, size): throughput(aws, args.messages, size,
                                              0 if kind == "end_to_end" else args.round,
                                              idempotent=kind == "idempotent_consumers")
                     for kind in kinds for size in (10, 1)}
            lat = latency(aws, args.latency_samples)
        finally:
            server.stop()
    throughput_out: dict[str, Any] = {}
    for kind in kinds:
        batched, single = modes[(kind, 10)], modes[(kind, 1)]
        throughput_out[kind] = {
            "batched": batched, "one_at_a_time": single,
            "batched_over_one_at_a_time": round(
                batched["deliveries_per_s"] / single["deliveries_per_s"], 2)}
    result = {
        "endpoint": "embedded moto server (infra.aws.embedded.MotoServer)",
        "fanout": {"queues": 2},
        "throughput": throughput_out,
        "latency_s3_put_to_consumer": lat,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for kind, label in (("end_to_end", "producer+consumers"), ("consumers", "consumers only"),
                        ("idempotent_consumers", "idempotent only")):
        t = throughput_out[kind]
        print(f"{label:<19} batched {t['batched']['deliveries_per_s']:>8.1f} deliveries/s   "
              f"one-at-a-time {t['one_at_a_time']['deliveries_per_s']:>8.1f} deliveries/s   "
              f"ratio {t['batched_over_one_at_a_time']}x   SQS requests/message "
              f"{t['batched']['sqs_requests_per_message']} vs "
              f"{t['one_at_a_time']['sqs_requests_per_message']}")
    idem = throughput_out["idempotent_consumers"]
    print(f"idempotent consumers: DynamoDB requests/delivery batched "
          f"{idem['batched']['dynamodb_requests_per_delivery']} "
          f"({idem['batched']['dynamodb_requests']}), one at a time "
          f"{idem['one_at_a_time']['dynamodb_requests_per_delivery']}")
    print(f"latency     S3 put -> consumer  p50 {lat['all']['p50_ms']} ms   "
          f"p99 {lat['all']['p99_ms']} ms   ({lat['samples']} puts x 2 queues)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
