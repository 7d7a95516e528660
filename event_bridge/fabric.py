"""The event fabric as data: buckets, queues, topics, rules, archives and consumers.

One YAML file (``event_bridge/fabric.yaml`` by default) declares the whole S3 -> EventBridge ->
SNS -> SQS topology and which handler consumes which queue or topic; ``event_bridge.apply``
makes an account match it (create or update, never duplicate). Everything is validated
before a single call is made: references between resources must resolve, FIFO topics only
feed FIFO queues, names are the ones AWS accepts. The queue defaults follow prefect-aws's
discipline for event queues: every queue has a DLQ, ``maxReceiveCount`` 3 and a 300 s
visibility timeout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from infra.aws.naming import check_bucket_name
from infra.yaml_models import load_yaml_model

DEFAULT_FABRIC = Path(__file__).parent / "fabric.yaml"

QUEUE_RE = re.compile(r"^[A-Za-z0-9_-]{1,75}(\.fifo)?$")
TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,251}(\.fifo)?$")
RULE_RE = re.compile(r"^[.\-_A-Za-z0-9]{1,64}$")
TARGET_ID_RE = re.compile(r"^[.\-_A-Za-z0-9]{1,64}$")
HANDLER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class FabricError(ValueError):
    """A fabric file that cannot be applied; the message names every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueueSpec(_Strict):
    name: str
    visibility_timeout: int = Field(300, ge=0, le=43200)
    max_receive_count: int = Field(3, ge=1, le=1000)
    retention_seconds: int = Field(345600, ge=60, le=1209600)
    dlq_retention_seconds: int = Field(1209600, ge=60, le=1209600)
    # False only for a queue that is itself a dead-letter destination (an on-failure queue).
    dead_letter: bool = True
    content_based_deduplication: bool = False
    # Consumers ask for long polling per call; 0 keeps a plain receive non-blocking.
    wait_time_seconds: int = Field(0, ge=0, le=20)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not QUEUE_RE.match(v):
            raise ValueError(f"{v!r} is not a valid SQS queue name (letters, digits, - and _, "
                             "at most 80 characters with an optional .fifo suffix)")
        return v

    @property
    def fifo(self) -> bool:
        return self.name.endswith(".fifo")

    @property
    def dlq_name(self) -> str:
        base = self.name.removesuffix(".fifo")
        return f"{base}-dlq.fifo" if self.fifo else f"{base}-dlq"


class SubscriptionSpec(_Strict):
    queue: str
    filter_policy: dict[str, Any] | None = None
    filter_scope: Literal["MessageBody", "MessageAttributes"] = "MessageBody"
    raw: bool = True


class TopicSpec(_Strict):
    name: str
    content_based_deduplication: bool = False
    subscriptions: list[SubscriptionSpec] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TOPIC_RE.match(v):
            raise ValueError(f"{v!r} is not a valid SNS topic name")
        return v

    @property
    def fifo(self) -> bool:
        return self.name.endswith(".fifo")


class InputTransformer(_Strict):
    paths: dict[str, str] = Field(default_factory=dict)
    template: str


class TargetSpec(_Strict):
    """Exactly one of ``topic`` or ``queue``, both names declared in the same fabric."""

    topic: str | None = None
    queue: str | None = None
    id: str | None = None
    input_transformer: InputTransformer | None = None
    # For a FIFO queue target: the group its events go to (EventBridge needs one).
    message_group_id: str | None = None

    @model_validator(mode="after")
    def _one(self) -> TargetSpec:
        if (self.topic is None) == (self.queue is None):
            raise ValueError("a target names exactly one of 'topic' or 'queue'")
        if self.id is not None and not TARGET_ID_RE.match(self.id):
            raise ValueError(f"target id {self.id!r} must match [.-_A-Za-z0-9]{{1,64}}")
        return self

    @property
    def target_id(self) -> str:
        return self.id or (f"topic-{self.topic}" if self.topic else f"queue-{self.queue}")[:64]


class PatternExamples(_Strict):
    """Events the rule's pattern must (not) match, checked with TestEventPattern on apply."""

    match: list[dict[str, Any]] = Field(default_factory=list)
    no_match: list[dict[str, Any]] = Field(default_factory=list)


class RuleSpec(_Strict):
    name: str
    bus: str = "default"
    description: str = ""
    pattern: dict[str, Any]
    targets: list[TargetSpec] = Field(min_length=1)
    examples: PatternExamples = PatternExamples()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not RULE_RE.match(v):
            raise ValueError(f"{v!r} is not a valid rule name ([.-_A-Za-z0-9], at most 64)")
        return v

    @model_validator(mode="after")
    def _unique_targets(self) -> RuleSpec:
        ids = [t.target_id for t in self.targets]
        if len(set(ids)) != len(ids):
            raise ValueError(f"rule {self.name}: target ids must be unique, got {ids}")
        return self


class QueueNotification(_Strict):
    """A direct S3 Event Notification to a queue (no EventBridge): the cheaper variant."""

    id: str
    queue: str
    events: list[str] = Field(default_factory=lambda: ["s3:ObjectCreated:*"], min_length=1)
    prefix: str = ""
    suffix: str = ""


class BucketSpec(_Strict):
    name: str
    create: bool = True
    eventbridge: bool = True
    queue_notifications: list[QueueNotification] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_bucket_name(v)  # S3's full rules, shared with the pipeline spec


class ArchiveSpec(_Strict):
    name: str
    bus: str = "default"
    pattern: dict[str, Any] | None = None
    retention_days: int = Field(30, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not RULE_RE.match(v) or len(v) > 48:
            raise ValueError(f"{v!r} is not a valid archive name ([.-_A-Za-z0-9], at most 48)")
        return v


class ConsumerSpec(_Strict):
    """A handler with the AWS Lambda signature, fed by a queue or a topic.

    A queue consumer gets SQS batches (``{"Records": [...]}``) and answers with a partial
    batch response; a topic consumer gets SNS events, is retried ``max_attempts`` times and
    then its event goes to ``on_failure_queue`` (Lambda's asynchronous invocation).
    """

    name: str | None = None
    queue: str | None = None
    topic: str | None = None
    handler: str
    # None: 10 on a standard queue, 1 on a FIFO queue (see event_bridge.runtime).
    batch_size: int | None = Field(None, ge=1, le=10)
    # False: only ``events drain`` runs it, not the long-running ``events consume`` (a queue
    # another process reads, e.g. the pipeline's own consume stage).
    background: bool = True
    on_failure_queue: str | None = None
    max_attempts: int = Field(3, ge=1, le=3)
    # Seconds before each retry of a failed topic invocation (Lambda waits ~1 and ~2 minutes).
    retry_delays: list[float] = Field(default_factory=lambda: [1.0, 2.0])
    filter_policy: dict[str, Any] | None = None

    @field_validator("handler")
    @classmethod
    def _handler(cls, v: str) -> str:
        if not HANDLER_RE.match(v):
            raise ValueError(f"{v!r} must be 'package.module:function'")
        return v

    @model_validator(mode="after")
    def _source(self) -> ConsumerSpec:
        if (self.queue is None) == (self.topic is None):
            raise ValueError("a consumer reads exactly one of 'queue' or 'topic'")
        if self.queue is not None and (self.on_failure_queue or self.filter_policy):
            raise ValueError("on_failure_queue and filter_policy apply to topic consumers; "
                             "a queue consumer's failures go to the queue's DLQ")
        return self

    @property
    def consumer_name(self) -> str:
        return self.name or (self.queue or self.topic or "")


class DedupSpec(_Strict):
    table: str = Field("clusterflow-dedup", pattern=r"^[A-Za-z0-9_.-]{3,255}$")
    # How long a processed event is remembered (DynamoDB TTL); replays older than this
    # are processed again.
    retention_days: int = Field(14, ge=1)


class Fabric(_Strict):
    region: str | None = None
    buckets: list[BucketSpec] = Field(default_factory=list)
    queues: list[QueueSpec] = Field(default_factory=list)
    topics: list[TopicSpec] = Field(default_factory=list)
    rules: list[RuleSpec] = Field(default_factory=list)
    archives: list[ArchiveSpec] = Field(default_factory=list)
    consumers: list[ConsumerSpec] = Field(default_factory=list)
    # None: no dedup table (consumers that need idempotency then cannot run here).
    dedup: DedupSpec | None = DedupSpec()

    @field_validator("region")
    @classmethod
    def _region_name(cls, v: str | None) -> str | None:
        from botocore.exceptions import InvalidRegionError
        from botocore.utils import validate_region_name

        try:
            if v is not None:
                validate_region_name(v)  # botocore's rule, checked before any call
        except InvalidRegionError:
            raise ValueError(f"{v!r} is not an AWS region name (like us-east-1)") from None
        return v

    def queue(self, name: str) -> QueueSpec:
        return next(q for q in self.queues if q.name == name)

    def topic(self, name: str) -> TopicSpec:
        return next(t for t in self.topics if t.name == name)

    @model_validator(mode="after")
    def _references(self) -> Fabric:
        problems: list[str] = []
        queues = {q.name: q for q in self.queues}
        topics = {t.name: t for t in self.topics}
        for kind, names in (("queue", [q.name for q in self.queues]),
                            ("topic", [t.name for t in self.topics]),
                            ("rule", [r.name for r in self.rules]),
                            ("bucket", [b.name for b in self.buckets]),
                            ("archive", [a.name for a in self.archives]),
                            ("consumer", [c.consumer_name for c in self.consumers])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                problems.append(f"{kind} names must be unique: {', '.join(dupes)}")
        dlqs = {q.dlq_name for q in self.queues if q.dead_letter}
        clash = sorted(dlqs & set(queues))
        if clash:
            problems.append(f"queues {', '.join(clash)} clash with another queue's DLQ name")
        for t in self.topics:
            for s in t.subscriptions:
                q = queues.get(s.queue)
                if q is None:
                    problems.append(f"topic {t.name}: subscribed queue {s.queue!r} is not declared")
                elif q.fifo != t.fifo:
                    problems.append(f"topic {t.name}: a {'FIFO' if t.fifo else 'standard'} "
                                    f"topic cannot deliver to {'FIFO' if q.fifo else 'standard'}"
                                    f" queue {q.name}")
        for r in self.rules:
            for tg in r.targets:
                if tg.topic is not None and tg.topic not in topics:
                    problems.append(f"rule {r.name}: target topic {tg.topic!r} is not declared")
                if tg.queue is not None:
                    q = queues.get(tg.queue)
                    if q is None:
                        problems.append(f"rule {r.name}: target queue {tg.queue!r} is not "
                                        "declared")
                    elif q.fifo and not tg.message_group_id:
                        problems.append(f"rule {r.name}: FIFO queue target {q.name} needs "
                                        "message_group_id")
                    elif q.fifo and not q.content_based_deduplication:
                        problems.append(f"rule {r.name}: EventBridge can only send to FIFO "
                                        f"queue {q.name} with content_based_deduplication")
        for b in self.buckets:
            for n in b.queue_notifications:
                if n.queue not in queues:
                    problems.append(f"bucket {b.name}: notification queue {n.queue!r} is not "
                                    "declared")
                elif queues[n.queue].fifo:
                    problems.append(f"bucket {b.name}: S3 cannot notify FIFO queue {n.queue}")
        for c in self.consumers:
            if c.queue is not None and c.queue not in queues:
                problems.append(f"consumer {c.consumer_name}: queue {c.queue!r} is not declared")
            if c.topic is not None and c.topic not in topics:
                problems.append(f"consumer {c.consumer_name}: topic {c.topic!r} is not declared")
            if c.on_failure_queue is not None and c.on_failure_queue not in queues:
                problems.append(f"consumer {c.consumer_name}: on_failure_queue "
                                f"{c.on_failure_queue!r} is not declared")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def load_fabric(path: Path | str = DEFAULT_FABRIC) -> Fabric:
    return load_yaml_model(path, Fabric, what="fabric file", error=FabricError)
