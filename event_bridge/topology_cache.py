"""Apply the fan-out topology once, then only check that it still stands.

Applying the topology (``apply_topology``) reads and compares every queue, DLQ, policy,
subscription, rule, target and bucket notification before it knows there is nothing to do:
~30 requests, 0.5-0.7 s of every ``clusterflow run`` on the embedded endpoint, spent to find
the same topology as the run before. So the first apply records a fingerprint of what was
applied (a hash of the ``FanOutTopology`` and the endpoint) with its ARNs and URLs in the
state dir; a later run with the same fingerprint only verifies, with a few read-only
requests, that the pieces still exist and are still wired together:

* each queue still exists and its redrive policy still names its DLQ, which exists;
* the topic still exists and still has a subscription for each queue;
* the rule still exists and still targets the topic;
* the results bucket still sends its events to EventBridge.

Anything missing or different (a deleted queue, a new endpoint whose moto lost its state, a
changed spec) falls back to the full idempotent apply, which re-creates what is gone and
records the new fingerprint. Changes to what the check does not read (a hand-edited queue
policy, say) are only repaired by ``clusterflow events apply`` or by deleting the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from event_bridge.topology import AppliedTopology, FanOutTopology, apply_topology
from infra.aws.clients import AwsTarget

log = logging.getLogger(__name__)

# Bump when what apply_topology creates changes, so old records are not trusted.
FORMAT = 1


def fingerprint(aws: AwsTarget, topo: FanOutTopology) -> str:
    """Same topology on the same endpoint and region -> same fingerprint."""
    doc = {"format": FORMAT, "endpoint": aws.endpoint_url or "aws", "region": aws.region,
           "topology": asdict(topo)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _record_path(cache_dir: Path, fp: str) -> Path:
    return cache_dir / f"{fp[:32]}.json"


def _load(cache_dir: Path, fp: str) -> AppliedTopology | None:
    try:
        doc = json.loads(_record_path(cache_dir, fp).read_text())
        if doc.get("fingerprint") != fp:
            return None
        return AppliedTopology(**doc["applied"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _store(cache_dir: Path, fp: str, applied: AppliedTopology) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = _record_path(cache_dir, fp)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "applied": asdict(applied)}))
        tmp.replace(path)
    except OSError as e:  # a read-only state dir only costs the next run a full apply
        log.warning("could not record the applied topology in %s: %s", cache_dir, e)


def still_standing(aws: AwsTarget, topo: FanOutTopology, applied: AppliedTopology) -> bool:
    """True if every recorded piece still exists and is wired as applied (read-only)."""
    sqs, sns = aws.client("sqs"), aws.client("sns")
    events, s3 = aws.client("events"), aws.client("s3")

    def queue_ok(q: str) -> bool:
        attrs = sqs.get_queue_attributes(QueueUrl=applied.queue_urls[q], AttributeNames=[
            "RedrivePolicy"])["Attributes"]
        dlq_arn = json.loads(attrs.get("RedrivePolicy") or "{}").get("deadLetterTargetArn")
        dlq = sqs.get_queue_attributes(QueueUrl=applied.dlq_urls[q], AttributeNames=[
            "QueueArn"])["Attributes"]
        return dlq_arn is not None and dlq_arn == dlq.get("QueueArn")

    def topic_ok() -> bool:
        subscribed = set()
        kwargs: dict[str, Any] = {"TopicArn": applied.topic_arn}
        while True:
            page = sns.list_subscriptions_by_topic(**kwargs)
            subscribed |= {s["Endpoint"].rsplit(":", 1)[-1] for s in page["Subscriptions"]
                           if s["Protocol"] == "sqs"}
            if not page.get("NextToken"):
                break
            kwargs["NextToken"] = page["NextToken"]
        return set(topo.queues) <= subscribed

    def rule_ok() -> bool:
        targets = events.list_targets_by_rule(Rule=topo.rule_name)["Targets"]
        return any(t["Arn"] == applied.topic_arn for t in targets)

    def bucket_ok() -> bool:
        conf = s3.get_bucket_notification_configuration(Bucket=topo.results_bucket)
        return "EventBridgeConfiguration" in conf

    checks = [lambda q=q: queue_ok(q) for q in topo.queues] + [topic_ok, rule_ok, bucket_ok]
    try:
        with ThreadPoolExecutor(max_workers=len(checks)) as pool:
            return all(pool.map(lambda check: check(), checks))
    except (ClientError, BotoCoreError, KeyError, ValueError) as e:
        log.info("the recorded fan-out topology is incomplete (%s); applying it again", e)
        return False


def ensure_topology(aws: AwsTarget, topo: FanOutTopology,
                    cache_dir: Path) -> tuple[AppliedTopology, bool]:
    """The applied topology and whether it had to be (re-)applied this time."""
    fp = fingerprint(aws, topo)
    recorded = _load(cache_dir, fp)
    if recorded is not None and set(recorded.queue_urls) == set(topo.queues) \
            and still_standing(aws, topo, recorded):
        return recorded, False
    applied = apply_topology(aws, topo)
    _store(cache_dir, fp, applied)
    return applied, True
