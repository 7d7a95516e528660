"""Re-deliver archived events from a time window: EventBridge StartReplay.

Replayed events reach the fabric's own rules only (``Destination.FilterArns``), so a replay
does not set off rules that other tools keep on the same bus. Consumers stay correct under a
replay because they are idempotent (the dedup store): events they already processed are
acknowledged without running again, events they missed are processed.

moto 5.2.5 ignores the window and the rule filter; the embedded endpoint's extension
(``infra.aws.moto_gaps.fanout``) makes it honour both, as AWS does.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from event_bridge.fabric import Fabric
from infra.aws.clients import AwsTarget

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (``2026-01-31T12:00:00Z``; no zone: UTC), ``now``, or ``-15m``/``-2h``/``-1d``."""
    now = now or datetime.now(timezone.utc)
    text = text.strip()
    if text == "now":
        return now
    m = _RELATIVE.match(text)
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use ISO 8601 (2026-01-31T12:00:00Z), "
                         "'now', or a relative time like -15m, -2h, -1d") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def replay(aws: AwsTarget, fabric: Fabric, since: datetime, until: datetime,
           archive: str | None = None, wait_s: float = 600.0) -> dict[str, Any]:
    if since >= until:
        raise ValueError(f"--since ({since.isoformat()}) must be before --until "
                         f"({until.isoformat()})")
    if not fabric.archives:
        raise LookupError("the fabric declares no archive to replay from")
    names = [a.name for a in fabric.archives]
    spec = next((a for a in fabric.archives if a.name == (archive or names[0])), None)
    if spec is None:
        raise LookupError(f"archive {archive!r} is not in the fabric (have: {', '.join(names)})")
    events = aws.client("events")
    archive_arn = events.describe_archive(ArchiveName=spec.name)["ArchiveArn"]
    bus_arn = events.describe_event_bus(Name=spec.bus)["Arn"]
    rules = [events.describe_rule(Name=r.name, EventBusName=r.bus)["Arn"]
             for r in fabric.rules if r.bus == spec.bus]
    name = f"{spec.name}-{until:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"[-64:].lstrip("-.")
    destination: dict[str, Any] = {"Arn": bus_arn}
    if rules:
        destination["FilterArns"] = rules
    events.start_replay(ReplayName=name, EventSourceArn=archive_arn, EventStartTime=since,
                        EventEndTime=until, Destination=destination,
                        Description=f"clusterflow events replay {since.isoformat()} .. "
                                    f"{until.isoformat()}")
    deadline = time.monotonic() + wait_s
    while True:
        state = events.describe_replay(ReplayName=name)
        if state["State"] in ("COMPLETED", "FAILED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(2)
    if state["State"] == "FAILED":
        raise RuntimeError(f"replay {name} failed: {state.get('StateReason', 'no reason')}")
    return {
        "replay": name, "archive": spec.name, "state": state["State"],
        "since": since.isoformat(), "until": until.isoformat(),
        "rules": [r.rsplit("/", 1)[-1] for r in rules],
    }
