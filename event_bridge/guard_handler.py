"""The guard's Lambda-signature handler: findings in, blocks with a TTL out.

Fed by the ``guard-events`` queue, which two rules of the fabric fill: GuardDuty findings
(SSH/RDP brute force, port probes) and the CloudTrail network-change rule. For each offending
address it calls :meth:`infra.guard.service.Guard.block` with the config's ``auto_block_ttl``;
an allowlisted address is never blocked (the refusal is published instead), a duplicate
finding finds the block already recorded and changes nothing, and every block is published
to the security-alerts topic by the guard itself. An EventBridge ``Scheduled Event`` on the
same handler runs the sweep (the AWS alternative to the Prefect ``guard-sweep`` deployment).

Its config is ``$CLUSTERFLOW_GUARD_CONFIG`` (packaged with the function on AWS); without one
the guard is off and events are acknowledged and ignored. It never creates resources
(``clusterflow guard init`` does), which keeps its IAM policy (infra/iam/guard-handler.json)
to updates of the guard's own IP sets, NACL entries, table and topic.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from event_bridge.batch import sqs_batch_handler
from event_bridge.consumer import PoisonMessage
from event_bridge.lambda_shapes import aws_for
from event_bridge.s3_events import unwrap_sns
from infra.guard import nacl
from infra.guard.alerts import publish
from infra.guard.cidr import parse_ttl
from infra.guard.config import DEFAULT_CONFIG_ENV, load_guard_config
from infra.guard.findings import NotAGuardEvent, offenders
from infra.guard.nacl import NaclRefused
from infra.guard.service import Guard, GuardRefused

log = logging.getLogger("clusterflow.guard")


def _guard(context: Any) -> Guard | None:
    path = os.environ.get(DEFAULT_CONFIG_ENV)
    if not path:
        return None
    return Guard(aws_for(context), load_guard_config(path))


def handle_event(doc: dict[str, Any], context: Any) -> list[dict[str, Any]]:
    """One EventBridge event -> what was blocked, skipped or refused."""
    guard = _guard(context)
    if guard is None:
        log.info("guard not configured (%s unset): event ignored", DEFAULT_CONFIG_ENV)
        return []
    if (doc.get("source"), doc.get("detail-type")) == ("aws.events", "Scheduled Event"):
        return [{"unblocked": r.record.cidr} for r in guard.sweep()]
    acls = set(nacl.acls_for_subnets(guard.ec2, guard.cfg.subnets))
    try:
        found = offenders(doc, acls, set(guard.cfg.security_groups), guard.identity()["Arn"])
    except (NotAGuardEvent, KeyError, TypeError) as e:
        raise PoisonMessage(f"guard: {e}") from None
    ttl_s = parse_ttl(guard.cfg.auto_block_ttl)
    me = getattr(context, "invoked_function_arn", None) or "clusterflow guard handler"
    results = []
    for o in found:
        try:
            r = guard.block(o.address, ttl_s, o.reason, source=doc["source"],
                            by=f"{me} ({o.origin})")
            results.append({"cidr": r.record.cidr, "already": r.already})
            log.warning("guard: %s %s (%s)", "already blocked" if r.already else "blocked",
                        r.record.cidr, o.reason)
        except (GuardRefused, NaclRefused) as e:
            # Retrying cannot help: tell people instead of filling the DLQ.
            log.error("guard: not blocking %s: %s", o.address, e)
            publish(guard.aws, guard.alerts_arn, "Guard Block Refused",
                    {"cidr": o.address, "reason": o.reason, "refused": str(e)})
            results.append({"cidr": o.address, "refused": str(e)})
    return results


def _record(record: dict[str, Any], context: Any) -> None:
    try:
        doc = unwrap_sns(json.loads(record["body"]))
    except ValueError:
        raise PoisonMessage("guard: the message is not JSON") from None
    if not isinstance(doc, dict):
        raise PoisonMessage("guard: the message is not an EventBridge event")
    handle_event(doc, context)


# No dedup table: the registry's conditional put is already the idempotency point (a
# duplicate finding or a redelivered message finds the block recorded and changes nothing).
handle = sqs_batch_handler(_record, idempotent=False)
