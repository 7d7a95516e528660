"""The fan-out topology: S3 -> EventBridge rule -> SNS topic -> SQS queues (each with a DLQ).

Applied idempotently (create or update, never duplicate), so running a pipeline twice against
the same account or endpoint converges on one topology. Policies are the ones real AWS needs
(EventBridge may publish to the topic, the topic may send to each queue); moto stores them.

Specs share the topic and queues by name, but the rule is per results bucket: one spec's
run must not rewrite the rule that feeds another bucket (a shared rule matched only the
bucket of whichever spec applied it last, silently cutting the others off from fan-out).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from botocore.exceptions import ClientError

from event_bridge.apply import apply_fabric
from event_bridge.fabric import (
    BucketSpec,
    Fabric,
    QueueSpec,
    RuleSpec,
    SubscriptionSpec,
    TargetSpec,
    TopicSpec,
)
from infra.aws.clients import AwsTarget


@dataclass(frozen=True)
class FanOutTopology:
    results_bucket: str
    key_prefix: str
    key_suffix: str
    topic: str
    queues: tuple[str, ...]
    max_receive_count: int = 3
    visibility_timeout: int = 300

    @property
    def rule_name(self) -> str:
        """``<topic>-<bucket>-<suffix>``: one rule per results bucket (at most 64 chars)."""
        name = f"{self.topic}-{self.results_bucket}-{self.key_suffix.replace('.', '-')}"
        if len(name) <= 64:
            return name
        return f"{name[:55]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"

    @property
    def legacy_rule_name(self) -> str:
        """The name every spec's rule had before it was per bucket (one rule, clobbered)."""
        return f"{self.topic}-{self.key_suffix.replace('.', '-')}"[:64]

    def event_pattern(self) -> dict:
        """S3 "Object Created" events for ``<prefix>*<suffix>`` in the results bucket only.

        ``wildcard`` expresses prefix AND suffix in one filter; a list of ``prefix`` and
        ``suffix`` filters would be an OR. Every put also emits "Object Tags Added", which the
        ``detail-type`` filter drops.
        """
        return {
            "source": ["aws.s3"],
            "detail-type": ["Object Created"],
            "detail": {
                "bucket": {"name": [self.results_bucket]},
                "object": {"key": [{"wildcard": f"{self.key_prefix}*{self.key_suffix}"}]},
            },
        }


@dataclass
class AppliedTopology:
    rule_arn: str
    topic_arn: str
    queue_urls: dict[str, str] = field(default_factory=dict)
    dlq_urls: dict[str, str] = field(default_factory=dict)


def topology_fabric(topo: FanOutTopology) -> Fabric:
    """The pipeline's fan-out as a fabric, so it is applied by the same idempotent code."""
    return Fabric(
        buckets=[BucketSpec(name=topo.results_bucket, create=False, eventbridge=True)],
        queues=[QueueSpec(name=q, visibility_timeout=topo.visibility_timeout,
                          max_receive_count=topo.max_receive_count) for q in topo.queues],
        topics=[TopicSpec(name=topo.topic,
                          subscriptions=[SubscriptionSpec(queue=q) for q in topo.queues])],
        rules=[RuleSpec(
            name=topo.rule_name, pattern=topo.event_pattern(),
            description=f"Result manifests in s3://{topo.results_bucket}/{topo.key_prefix} -> SNS",
            targets=[TargetSpec(topic=topo.topic, id="fanout-topic")])],
        dedup=None,
    )


def retire_legacy_rule(aws: AwsTarget, topo: FanOutTopology) -> bool:
    """Delete the old shared rule ``<topic>-<suffix>`` if it is clusterflow's fan-out rule.

    Left in place it would deliver a bucket's manifests a second time, beside the bucket's
    own rule. Only a rule whose sole target is this topic under clusterflow's target id is
    removed; anything else by that name is someone else's and is kept.
    """
    events = aws.client("events")
    name = topo.legacy_rule_name
    try:
        events.describe_rule(Name=name)
    except ClientError as e:
        if e.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        return False
    targets = events.list_targets_by_rule(Rule=name)["Targets"]
    if [(t["Id"], t["Arn"].rsplit(":", 1)[-1]) for t in targets] != [
            ("fanout-topic", topo.topic)]:
        return False
    events.remove_targets(Rule=name, Ids=["fanout-topic"])
    events.delete_rule(Name=name)
    return True


def apply_topology(aws: AwsTarget, topo: FanOutTopology) -> AppliedTopology:
    applied = apply_fabric(aws, topology_fabric(topo))
    if topo.legacy_rule_name != topo.rule_name:
        retire_legacy_rule(aws, topo)
    return AppliedTopology(
        rule_arn=applied.rules[topo.rule_name],
        topic_arn=applied.topics[topo.topic],
        queue_urls={q: applied.queues[q].url for q in topo.queues},
        dlq_urls={q: applied.queues[q].dlq_url or "" for q in topo.queues},
    )
