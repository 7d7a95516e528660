"""EventBridge buses, rules (pattern, targets) and archives of a fabric.

Part of ``event_bridge.apply``. Patterns that carry examples are checked with
TestEventPattern before anything is created, so a wrong pattern fails the apply instead of
silently matching nothing; a rule's stale targets are removed, other rules are never touched.
"""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from event_bridge.fabric import ArchiveSpec, RuleSpec


class PatternCheckFailed(ValueError):
    """A rule's pattern does not (or does) match an example the fabric says it should (not)."""



def bus_arn(events: Any, bus: str, changes: list[str]) -> str:
    try:
        return events.describe_event_bus(Name=bus)["Arn"]
    except ClientError as e:
        if bus == "default" or e.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
    arn = events.create_event_bus(Name=bus)["EventBusArn"]
    changes.append(f"created event bus {bus}")
    return arn


def check_examples(events: Any, rule: RuleSpec) -> None:
    pattern = json.dumps(rule.pattern)
    for expected, examples in ((True, rule.examples.match), (False, rule.examples.no_match)):
        for example in examples:
            got = events.test_event_pattern(EventPattern=pattern,
                                            Event=json.dumps(example))["Result"]
            if got is not expected:
                raise PatternCheckFailed(
                    f"rule {rule.name}: its pattern {'does not match' if expected else 'matches'}"
                    f" the example event {json.dumps(example)[:300]}; fix the pattern or the "
                    f"example in the fabric")


def ensure_rule(events: Any, rule: RuleSpec, targets: list[dict[str, Any]],
                changes: list[str]) -> str:
    pattern = json.dumps(rule.pattern, sort_keys=True)
    try:
        current = events.describe_rule(Name=rule.name, EventBusName=rule.bus)
    except ClientError as e:
        if e.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        current = None
    wanted = {"EventPattern": rule.pattern, "State": "ENABLED",
              "Description": rule.description}
    if current is None or {
        "EventPattern": json.loads(current.get("EventPattern") or "null"),
        "State": current.get("State"), "Description": current.get("Description", ""),
    } != wanted:
        arn = events.put_rule(Name=rule.name, EventBusName=rule.bus, EventPattern=pattern,
                              State="ENABLED", Description=rule.description)["RuleArn"]
        changes.append(f"{'created' if current is None else 'updated'} rule {rule.name}")
    else:
        arn = current["Arn"]
    existing = {t["Id"]: t for page in events.get_paginator("list_targets_by_rule").paginate(
        Rule=rule.name, EventBusName=rule.bus) for t in page["Targets"]}
    stale = sorted(set(existing) - {t["Id"] for t in targets})
    if stale:
        events.remove_targets(Rule=rule.name, EventBusName=rule.bus, Ids=stale)
        changes.append(f"removed targets {', '.join(stale)} from rule {rule.name}")
    differ = [t for t in targets if _managed(existing.get(t["Id"])) != t]
    if differ:
        resp = events.put_targets(Rule=rule.name, EventBusName=rule.bus, Targets=differ)
        if resp.get("FailedEntryCount"):
            raise RuntimeError(f"rule {rule.name}: targets refused: {resp['FailedEntries']}")
        changes.append(f"put targets {', '.join(t['Id'] for t in differ)} on rule {rule.name}")
    return arn


_TARGET_KEYS = ("Id", "Arn", "InputTransformer", "SqsParameters", "Input", "InputPath")


def _managed(target: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if target is None else {k: v for k, v in target.items() if k in _TARGET_KEYS}


def ensure_archive(events: Any, spec: ArchiveSpec, source_arn: str, changes: list[str]) -> str:
    pattern = json.dumps(spec.pattern, sort_keys=True) if spec.pattern else None
    try:
        current = events.describe_archive(ArchiveName=spec.name)
    except ClientError as e:
        if e.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        kwargs: dict[str, Any] = {"ArchiveName": spec.name, "EventSourceArn": source_arn,
                                  "RetentionDays": spec.retention_days}
        if pattern:
            kwargs["EventPattern"] = pattern
        arn = events.create_archive(**kwargs)["ArchiveArn"]
        changes.append(f"created archive {spec.name}")
        return arn
    if current["EventSourceArn"] != source_arn:
        raise ValueError(f"archive {spec.name} exists on {current['EventSourceArn']}, not on "
                         f"{source_arn}; an archive cannot change bus: rename it in the fabric")
    now_pattern = json.loads(current["EventPattern"]) if current.get("EventPattern") else None
    if now_pattern != spec.pattern or int(current.get("RetentionDays", 0)) != spec.retention_days:
        kwargs = {"ArchiveName": spec.name, "RetentionDays": spec.retention_days}
        if pattern:
            kwargs["EventPattern"] = pattern
        events.update_archive(**kwargs)
        changes.append(f"updated archive {spec.name}")
    return current["ArchiveArn"]
