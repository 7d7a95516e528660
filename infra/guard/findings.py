"""What to block for an event: GuardDuty findings and CloudTrail network changes.

GuardDuty publishes each finding to EventBridge as ``source: aws.guardduty``,
``detail-type: GuardDuty Finding`` with the finding as ``detail`` (AWS, "GuardDuty finding
format"). The attacker's address is under ``detail.service.action``:

* ``actionType: NETWORK_CONNECTION`` (``UnauthorizedAccess:EC2/SSHBruteForce``,
  ``...RDPBruteForce``): ``networkConnectionAction.remoteIpDetails.ipAddressV4`` (or
  ``ipAddressV6``). Only ``connectionDirection: INBOUND`` is an attack on us; ``OUTBOUND``
  means our instance is the one brute-forcing, and the remote address is its victim.
* ``actionType: PORT_PROBE`` (``Recon:EC2/PortProbeUnprotectedPort``): one
  ``remoteIpDetails`` per entry of ``portProbeAction.portProbeDetails``.

GuardDuty re-publishes an ongoing finding (same ``detail.id``, higher ``service.count``)
every 6 hours by default; the registry's conditional put makes those duplicates no-ops.

A CloudTrail network change (``AWS API Call via CloudTrail`` on the cluster's own NACLs or
security groups) made from an address outside the allowlist blocks that address: whoever
holds credentials and edits the cluster's network from an unknown place should not also be
able to reach it. Calls by AWS services (``invokedBy``) or by the guard itself are ignored.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

BLOCKING_FINDINGS = (
    "UnauthorizedAccess:EC2/SSHBruteForce",
    "UnauthorizedAccess:EC2/RDPBruteForce",
    "Recon:EC2/PortProbeUnprotectedPort",
    "Recon:EC2/PortProbeEMRUnprotectedPort",
)


class NotAGuardEvent(ValueError):
    """The event is neither a GuardDuty finding nor a CloudTrail network change."""


@dataclass(frozen=True)
class Offender:
    address: str
    reason: str
    origin: str  # the finding id or CloudTrail event id, for "who blocked it"


def _ip(details: dict[str, Any] | None) -> str | None:
    details = details or {}
    return details.get("ipAddressV4") or details.get("ipAddressV6")


def from_finding(doc: dict[str, Any]) -> list[Offender]:
    detail = doc["detail"]
    ftype = detail.get("type", "")
    if ftype not in BLOCKING_FINDINGS:
        return []
    service = detail.get("service") or {}
    if service.get("archived"):
        return []
    action = service.get("action") or {}
    why = (f"GuardDuty {ftype} (severity {detail.get('severity', '?')}, "
           f"count {service.get('count', 1)})")
    found: list[str] = []
    if action.get("actionType") == "NETWORK_CONNECTION":
        conn = action.get("networkConnectionAction") or {}
        if conn.get("connectionDirection") == "INBOUND":
            found.append(_ip(conn.get("remoteIpDetails")) or "")
    elif action.get("actionType") == "PORT_PROBE":
        for probe in (action.get("portProbeAction") or {}).get("portProbeDetails", []):
            found.append(_ip(probe.get("remoteIpDetails")) or "")
    seen: list[str] = []
    for a in found:
        if a and a not in seen:
            seen.append(a)
    return [Offender(a, why, f"finding {detail.get('id', '?')}") for a in seen]


def from_cloudtrail(doc: dict[str, Any], acls: set[str], groups: set[str],
                    own_arn: str | None) -> list[Offender]:
    detail = doc["detail"]
    who = detail.get("userIdentity") or {}
    if who.get("invokedBy") or (own_arn and who.get("arn") == own_arn):
        return []
    params = detail.get("requestParameters") or {}
    resource = params.get("networkAclId") or params.get("groupId")
    if resource not in acls | groups:
        return []
    source = detail.get("sourceIPAddress", "")
    try:
        ipaddress.ip_address(source)
    except ValueError:  # "ec2.amazonaws.com", "AWS Internal": a service, not an address
        return []
    why = (f"{detail.get('eventName')} on {resource} by {who.get('arn', 'unknown')} from "
           "an address outside the allowlist")
    return [Offender(source, why, f"CloudTrail event {detail.get('eventID', doc.get('id'))}")]


def offenders(doc: dict[str, Any], acls: set[str], groups: set[str],
              own_arn: str | None) -> list[Offender]:
    kind = (doc.get("source"), doc.get("detail-type"))
    if kind == ("aws.guardduty", "GuardDuty Finding"):
        return from_finding(doc)
    if kind == ("aws.ec2", "AWS API Call via CloudTrail"):
        return from_cloudtrail(doc, acls, groups, own_arn)
    raise NotAGuardEvent(f"not a GuardDuty finding or CloudTrail call: {kind}")
