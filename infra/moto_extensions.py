"""Small, explicit extensions that close gaps of moto 5.2.5 inside the embedded AWS endpoint.

They run *inside the moto server process* (see ``infra.moto_server``), so every client still
talks plain AWS HTTP to it and the topology is the same one clusterflow builds on real AWS.
Each extension is a wrapper that only handles what moto lacks and defers everything else to
moto's own code, so upgrading moto shrinks this file instead of fighting it.

EventBridge -> SNS targets
    moto's ``Rule.send_to_targets`` raises ``NotImplementedError("Expr not defined for Rule")``
    for an ``arn:aws:sns:...`` target; on the S3 -> EventBridge path that error is swallowed
    and every later rule on the bus is skipped. Real EventBridge publishes the (optionally
    input-transformed) event JSON to the topic, which then fans out to its subscriptions with
    their filter policies. This wrapper does exactly that through moto's own SNS backend.
"""

from __future__ import annotations

import copy
import json
from typing import Any

_APPLIED = False


def _publish_to_sns(rule: Any, target: dict[str, Any], event: Any) -> None:
    from moto.core.utils import iso_8601_datetime_without_milliseconds, utcfromtimestamp
    from moto.sns import sns_backends
    from moto.utilities.arns import parse_arn

    if isinstance(event, dict) and "time" in event and not isinstance(event["time"], str):
        event = dict(event)
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


def apply() -> None:
    """Install the extensions; idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    from moto.events.models import Rule
    from moto.events.utils import EventTemplateParser

    original = Rule.send_to_targets

    def send_to_targets(self: Any, original_event: Any, transform_input: bool = True) -> None:
        sns_targets = [t for t in self.targets if t["Arn"].startswith("arn:aws:sns:")]
        if not sns_targets:
            return original(self, original_event, transform_input)
        if not self.event_pattern.matches_event(original_event):
            return None
        others = [t for t in self.targets if t not in sns_targets]
        if others:
            view = copy.copy(self)
            view.targets = others
            original(view, original_event, transform_input)
        for target in sns_targets:
            if transform_input:
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
    _APPLIED = True
