"""Small, explicit extensions that close gaps of moto 5.2.5 inside the embedded AWS endpoint.

They run *inside the moto server process* (see ``infra.aws.moto_server``), so every client still
talks plain AWS HTTP to it and the topology is the same one clusterflow builds on real AWS.
Each extension is a wrapper that only handles what moto lacks and defers everything else to
moto's own code, so upgrading moto shrinks this file instead of fighting it.

EventBridge -> SNS targets
    moto's ``Rule.send_to_targets`` raises ``NotImplementedError("Expr not defined for Rule")``
    for an ``arn:aws:sns:...`` target; on the S3 -> EventBridge path that error is swallowed
    and every later rule on the bus is skipped. Real EventBridge publishes the (optionally
    input-transformed) event JSON to the topic, which then fans out to its subscriptions with
    their filter policies. This wrapper does exactly that through moto's own SNS backend.

S3 -> EventBridge event identity
    moto builds every S3 "Object Created" event from one template with a fixed ``id`` and a
    fixed ``detail.object.sequencer``, so two different uploads look like the same event to
    anything that deduplicates (an idempotent consumer would drop every upload after the
    first). On AWS each event has its own id and each write its own, increasing sequencer. The
    rule wrapper gives such an event a fresh id and sequencer once, in place, before the first
    rule sees it, so every rule and the archive see the same values. Events that already carry
    their own id (``put_events``, replays) are left alone.

TestEventPattern
    moto answers with an empty body. Real EventBridge checks that the event has the mandatory
    fields and evaluates the pattern; this answers the same way with moto's own matcher, the
    one its rules use, so a pattern checked here is checked against the emulator's behaviour.

GetBucketNotificationConfiguration and EventBridge
    moto stores ``EventBridgeConfiguration`` and acts on it, but leaves it out when the
    configuration is read back, so a read-modify-write of a bucket's notifications (the only
    safe way to add one, since PutBucketNotificationConfiguration replaces them all) silently
    turns S3 -> EventBridge off. The wrapper adds it to the answer as AWS does.

SetQueueAttributes and the queue policy
    moto replaces the queue's ``Policy`` with whatever the call carries, so changing only the
    visibility timeout deletes the policy; AWS changes only the attributes named. The
    wrapper puts the current policy back into a call that does not name it.

S3 events and archives
    On the S3 path moto calls rules without input transformers, but an archive's managed
    rule *is* an input transformer (it needs the event's ingestion time), so archiving an
    S3 event raises inside moto: the event is not archived and, the error being swallowed,
    every rule after the archive's on the bus misses it. The wrapper archives such events the
    way moto archives ``put_events`` events.

Unreachable SNS HTTP endpoints
    moto POSTs to an ``http(s)`` subscription inside Publish and lets a connection error
    escape, so one dead endpoint (a local consumer that was killed) fails every publish to
    the topic and stops delivery to the subscriptions after it. SNS never fails a publisher
    for a subscriber: it retries the endpoint by its delivery policy and gives up. The
    wrapper logs the failed delivery and carries on.

StartReplay's time window and rule filter
    moto replays every archived event to every rule on the bus, whatever ``EventStartTime``,
    ``EventEndTime`` and ``Destination.FilterArns`` say, and skips input transformers. Real
    EventBridge replays only events whose time lies in the window, only to the listed rules,
    through each rule's targets as configured. ``Replay.replay_events`` is replaced by that.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
import uuid
from datetime import datetime
from typing import Any

_APPLIED = False
# The constants moto's S3 notifier puts in every EventBridge event (moto/s3/notifications.py,
# moto/events/utils.py); once moto stops using them the fix below becomes a no-op.
_MOTO_S3_EVENT_ID = "17793124-05d4-b198-2fde-7ededc63b103"
_MOTO_S3_SEQUENCER = "617f08299329d189"
_sequence = itertools.count()
# TestEventPattern: the fields AWS requires in the event (API reference, TestEventPattern).
_REQUIRED_EVENT_FIELDS = ("id", "account", "source", "time", "region", "resources", "detail-type")


def _publish_to_sns(rule: Any, target: dict[str, Any], event: Any) -> None:
    from moto.core.utils import iso_8601_datetime_without_milliseconds, utcfromtimestamp
    from moto.sns import sns_backends
    from moto.utilities.arns import parse_arn

    if isinstance(event, dict):
        event = {k: v for k, v in event.items() if k != "ingestion-time"}  # moto-internal
    if isinstance(event, dict) and "time" in event and not isinstance(event["time"], str):
        event["time"] = iso_8601_datetime_without_milliseconds(
            utcfromtimestamp(float(event["time"]))
        )
    message = event if isinstance(event, str) else json.dumps(event)
    arn = parse_arn(target["Arn"])
    backend = sns_backends[arn.account][arn.region]
    group_id = None
    dedup_id = None
    if target["Arn"].endswith(".fifo"):
        # EventBridge requires a group id for FIFO targets; use the rule's, or one per rule.
        group_id = target.get("SqsParameters", {}).get("MessageGroupId") or rule.name
        dedup_id = event.get("id") if isinstance(event, dict) else None
    backend.publish(message=message, arn=target["Arn"], group_id=group_id,
                    deduplication_id=dedup_id)


def _is_archive(target: dict[str, Any]) -> bool:
    """The target moto's CreateArchive puts on its managed rule (``arn:aws:events:REGION:::``)."""
    return target["Arn"].endswith(":::") and ":events:" in target["Arn"]


def _give_s3_event_its_own_identity(event: Any) -> None:
    if not (isinstance(event, dict) and event.get("source") == "aws.s3"
            and event.get("id") == _MOTO_S3_EVENT_ID):
        return
    event["id"] = str(uuid.uuid4())
    obj = event.get("detail", {}).get("object")
    if isinstance(obj, dict) and obj.get("sequencer") == _MOTO_S3_SEQUENCER:
        # Hex, increasing: what S3 documents sequencers to be (comparable per key).
        obj["sequencer"] = f"{time.time_ns():016X}{next(_sequence) % 0x10000:04X}"


def _epoch(value: Any) -> float:
    """An event or request time (epoch seconds, or ISO 8601 as events carry it) in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    text = str(value)
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _test_event_pattern(self: Any) -> tuple[str, dict[str, Any]]:
    from moto.events.exceptions import ValidationException
    from moto.events.models import EventPattern

    try:
        event = json.loads(self._get_param("Event") or "")
    except ValueError:
        raise ValidationException("Parameter Event is not valid.") from None
    if not isinstance(event, dict):
        raise ValidationException("Parameter Event is not valid.")
    missing = [f for f in _REQUIRED_EVENT_FIELDS if f not in event]
    if missing:
        raise ValidationException(
            f"Parameter Event is not valid. Reason: missing fields {', '.join(missing)}")
    pattern = EventPattern.load(self._get_param("EventPattern"))
    return json.dumps({"Result": pattern.matches_event(event)}), self.response_headers


def _replay_events(self: Any, archive: Any) -> None:
    """moto's ``Replay.replay_events`` with the window, FilterArns and transformers honoured."""
    from moto.core.utils import unix_time
    from moto.events.models import ReplayState, events_backends

    start, end = _epoch(self.event_start_time), _epoch(self.event_end_time)
    backend = events_backends[self.account_id][self.region]
    bus = backend.describe_event_bus(self.destination["Arn"].split("/")[-1])
    only = set(self.destination.get("FilterArns") or [])
    rules = [r for r in bus.rules.values() if not only or r.arn in only]
    for event in list(archive.events):
        if not start <= _epoch(event.get("time", 0)) < end:
            continue
        replayed = dict(event, **{"id": str(uuid.uuid4()), "replay-name": self.name})
        for rule in rules:
            rule.send_to_targets(copy.deepcopy(replayed), transform_input=True)
    self.state = ReplayState.COMPLETED
    self.end_time = unix_time()


def _get_bucket_notification(original: Any) -> Any:
    from moto.core.responses import ActionResult, EmptyResult

    def get_bucket_notification(self: Any) -> Any:
        config = self.backend.get_bucket_notification_configuration(self.bucket_name)
        if config is None or config.event_bridge is None:
            return original(self)
        serialized = self.serialized

        def with_eventbridge(result: Any) -> Any:
            if isinstance(result, EmptyResult) or not isinstance(result, ActionResult):
                result = ActionResult({"EventBridgeConfiguration": {}})
            else:
                result.result["EventBridgeConfiguration"] = {}  # type: ignore[index]
            return serialized(result)

        self.serialized = with_eventbridge
        try:
            return original(self)
        finally:
            del self.serialized

    return get_bucket_notification


def _keep_policy(original: Any) -> Any:
    def _set_attributes(self: Any, attributes: dict[str, Any], now: float | None = None) -> None:
        if "Policy" not in attributes and getattr(self, "policy", None) is not None:
            attributes = {**attributes, "Policy": self.policy}
        original(self, attributes, now)

    return _set_attributes


def _tolerate_dead_endpoints(original: Any) -> Any:
    import logging

    import requests

    log = logging.getLogger("clusterflow.moto_extensions")

    def publish(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.protocol not in ("http", "https"):
            return original(self, *args, **kwargs)
        try:
            return original(self, *args, **kwargs)
        except requests.RequestException as e:
            log.warning("SNS delivery to %s failed, dropped: %s", self.endpoint, e)
            return None

    return publish


def apply() -> None:
    """Install the extensions; idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    from moto.events.models import Replay, Rule
    from moto.events.responses import EventsHandler
    from moto.events.utils import EventTemplateParser
    from moto.s3.responses import S3Response
    from moto.sns.models import Subscription
    from moto.sqs.models import Queue

    original = Rule.send_to_targets

    def send_to_targets(self: Any, original_event: Any, transform_input: bool = True) -> None:
        _give_s3_event_its_own_identity(original_event)
        sns_targets = [t for t in self.targets if t["Arn"].startswith("arn:aws:sns:")]
        archives = [] if transform_input else [t for t in self.targets if _is_archive(t)]
        if not sns_targets and not archives:
            return original(self, original_event, transform_input)
        if not self.event_pattern.matches_event(original_event):
            return None
        others = [t for t in self.targets if t not in sns_targets and t not in archives]
        if others:
            view = copy.copy(self)
            view.targets = others
            original(view, original_event, transform_input)
        if archives:
            # The archive target is an input transformer that needs the ingestion time,
            # which S3 events lack; give the archived copy one, as put_events does.
            from moto.core.utils import unix_time

            view = copy.copy(self)
            view.targets = archives
            original(view, dict(original_event, **{"ingestion-time": unix_time()}), True)
        for target in sns_targets:
            if transform_input and "InputTransformer" in target:
                transformer = target.get("InputTransformer", {})
                event = EventTemplateParser.parse(
                    input_template=transformer.get("InputTemplate"),
                    input_paths_map=transformer.get("InputPathsMap", {}),
                    event=original_event,
                )
            else:
                event = copy.deepcopy(original_event)
            _publish_to_sns(self, target, event)
        return None

    Rule.send_to_targets = send_to_targets
    EventsHandler.test_event_pattern = _test_event_pattern
    Replay.replay_events = _replay_events
    Queue._set_attributes = _keep_policy(Queue._set_attributes)
    Subscription.publish = _tolerate_dead_endpoints(Subscription.publish)
    S3Response.get_bucket_notification = _get_bucket_notification(
        S3Response.get_bucket_notification)
    _APPLIED = True
