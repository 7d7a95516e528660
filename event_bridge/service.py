"""The fabric's consumers as a whole: drain them once, or run them until stopped.

``drain`` is for operators and tests: every queue that has a consumer is consumed until it is
truly empty (retries included), in parallel, and the result is one summary. Interrupted, it
hands back the messages and dedup claims it holds, so the next drain need not wait them out.
``consume`` is the long-running service ``clusterflow local up`` starts: one long-polling loop per
background queue consumer and one local SNS subscription per topic consumer, stopped cleanly
on SIGTERM/SIGINT (the batch in hand is finished, SNS subscriptions are removed).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from event_bridge.apply import resolve_fabric
from event_bridge.fabric import ConsumerSpec, Fabric
from event_bridge.idempotency import release_held_claims
from event_bridge.runtime import Backoff, SqsEventSource, load_handler, run_parallel
from event_bridge.sns_invoker import SnsInvoker
from infra.aws.clients import AwsTarget

log = logging.getLogger(__name__)


def queue_consumers(fabric: Fabric, only: list[str] | None = None,
                    background_only: bool = False) -> list[ConsumerSpec]:
    chosen = [c for c in fabric.consumers if c.queue is not None
              and (not background_only or c.background)]
    if only:
        unknown = sorted(set(only) - {c.queue for c in chosen} - {c.consumer_name for c in chosen})
        if unknown:
            raise LookupError(f"no consumer reads {', '.join(unknown)} in the fabric (have: "
                              f"{', '.join(sorted(c.queue or '' for c in chosen))})")
        chosen = [c for c in chosen if c.queue in only or c.consumer_name in only]
    return chosen


def drain(aws: AwsTarget, fabric: Fabric, only: list[str] | None = None,
          backoff: Backoff | None = None, timeout_s: float = 600.0) -> dict[str, Any]:
    """Consume every fabric queue that has a consumer until empty; the JSON summary."""
    applied = resolve_fabric(aws, fabric)
    table = fabric.dedup.table if fabric.dedup else None
    backoff = backoff or Backoff()
    t0 = time.monotonic()
    sources: dict[str, SqsEventSource] = {}
    errors: dict[str, str] = {}
    for c in queue_consumers(fabric, only):
        assert c.queue is not None
        try:
            handler = load_handler(c.handler)
        except ImportError as e:
            errors[c.consumer_name] = str(e)
            continue
        sources[c.consumer_name] = SqsEventSource(
            aws, applied.queues[c.queue].url, handler, name=c.consumer_name,
            batch_size=c.batch_size, backoff=backoff, dedup_table=table)
    try:
        results = run_parallel({n: (lambda s=s: s.drain(timeout_s=timeout_s))
                                for n, s in sources.items()})
    except BaseException:  # SIGINT/SIGTERM (the CLI turns both into KeyboardInterrupt)
        handed_back = sum(s.stop() for s in sources.values())
        released = release_held_claims()
        log.warning("drain stopped: %d message(s) made visible again, %d claim(s) released",
                    handed_back, released)
        raise
    queues: dict[str, Any] = {}
    for name, source in sources.items():
        entry = source.stats.as_dict()
        if isinstance(results.get(name), Exception):
            entry["error"] = f"{type(results[name]).__name__}: {results[name]}"
        queues[name] = entry
    for name, text in errors.items():
        queues[name] = {"error": text}
    return {
        "processed": sum(q.get("processed", 0) for q in queues.values()),
        "failed": sum(q.get("failed", 0) for q in queues.values()),
        "sent_to_dlq": sum(q.get("sent_to_dlq", 0) for q in queues.values()),
        "seconds": round(time.monotonic() - t0, 3),
        "queues": queues,
        "ok": not any("error" in q for q in queues.values()),
    }


def consume(aws: AwsTarget, fabric: Fabric, stop: threading.Event,
            only: list[str] | None = None, wait_time_s: int = 5,
            backoff: Backoff | None = None) -> dict[str, Any]:
    """Run every background consumer until ``stop`` is set; returns their statistics."""
    applied = resolve_fabric(aws, fabric)
    table = fabric.dedup.table if fabric.dedup else None
    backoff = backoff or Backoff()
    sources = {
        c.consumer_name: SqsEventSource(
            aws, applied.queues[c.queue].url, load_handler(c.handler), name=c.consumer_name,
            batch_size=c.batch_size, backoff=backoff, dedup_table=table)
        for c in queue_consumers(fabric, only, background_only=True) if c.queue is not None
    }
    invokers: dict[str, SnsInvoker] = {}
    try:
        for c in fabric.consumers:
            if c.topic is None or not c.background or (only and c.consumer_name not in only):
                continue
            failure_url = applied.queues[c.on_failure_queue].url if c.on_failure_queue else None
            invokers[c.consumer_name] = SnsInvoker(
                aws, applied.topics[c.topic], load_handler(c.handler), name=c.consumer_name,
                on_failure_queue_url=failure_url, max_attempts=c.max_attempts,
                filter_policy=c.filter_policy, retry_delays_s=tuple(c.retry_delays),
                dedup_table=table).start()
        log.info("consuming: queues %s; topics %s", ", ".join(sources) or "-",
                 ", ".join(invokers) or "-")
        results = run_parallel({n: (lambda s=s: s.run(stop, wait_time_s))
                                for n, s in sources.items()} or
                               {"idle": lambda: stop.wait()})
    finally:
        for invoker in invokers.values():
            invoker.stop()
    out: dict[str, Any] = {n: s.stats.as_dict() for n, s in sources.items()}
    out.update({n: i.stats.as_dict() for n, i in invokers.items()})
    for name, result in results.items():
        if isinstance(result, Exception) and name in out:
            out[name]["error"] = f"{type(result).__name__}: {result}"
    return out
