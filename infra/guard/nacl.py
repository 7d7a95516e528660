"""Deny entries on the cluster subnets' network ACLs.

A NACL evaluates its entries in rule-number order and the first match wins, so a deny only
works below (numbered lower than) the first allow that would match. The guard allocates the
lowest free number from ``first_rule`` up to just under the direction's first allow rule, never
reuses a number, refuses when the ACL already holds ``entry_limit`` entries in that direction
(AWS's quota, 20 by default, the ``*`` default rule not counted), and on unblock deletes an
entry only if it is still the deny of that CIDR it placed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from infra.guard.cidr import Network, canonical
from infra.guard.config import NaclSettings

DEFAULT_RULE = 32767  # the '*' rule AWS shows last in every NACL


class NaclRefused(RuntimeError):
    """A NACL has no room for the entry; nothing was changed."""


@dataclass(frozen=True)
class NaclSlot:
    acl_id: str
    egress: bool
    rule: int

    @property
    def direction(self) -> str:
        return "outbound" if self.egress else "inbound"

    def placement(self, subnets: list[str]) -> dict[str, Any]:
        return {"layer": "nacl", "acl": self.acl_id, "egress": self.egress, "rule": self.rule,
                "subnets": subnets}


def acls_for_subnets(ec2: Any, subnets: list[str]) -> dict[str, list[str]]:
    """NACL id -> the configured subnets it guards (several subnets may share one ACL)."""
    if not subnets:
        return {}
    found: dict[str, list[str]] = {}
    acls = ec2.describe_network_acls(
        Filters=[{"Name": "association.subnet-id", "Values": subnets}])["NetworkAcls"]
    for acl in acls:
        for assoc in acl.get("Associations", []):
            if assoc.get("SubnetId") in subnets:
                found.setdefault(acl["NetworkAclId"], []).append(assoc["SubnetId"])
    missing = sorted(set(subnets) - {s for ss in found.values() for s in ss})
    if missing:
        raise NaclRefused(f"subnets {', '.join(missing)}: no network ACL found (wrong subnet "
                          "id, region or account?)")
    return found


def _entry_cidr(entry: dict[str, Any]) -> str | None:
    """The entry's block in canonical form (:func:`infra.guard.cidr.canonical`)."""
    return canonical(entry.get("CidrBlock") or entry.get("Ipv6CidrBlock"))


def _entries(ec2: Any, acl_id: str, egress: bool) -> list[dict[str, Any]]:
    acl = ec2.describe_network_acls(NetworkAclIds=[acl_id])["NetworkAcls"][0]
    return [e for e in acl["Entries"] if e["Egress"] == egress]


def free_slot(ec2: Any, acl_id: str, egress: bool, net: Network,
              settings: NaclSettings) -> NaclSlot | None:
    """The number a deny of ``net`` gets, None if it is already denied there, or NaclRefused."""
    entries = _entries(ec2, acl_id, egress)
    direction = "outbound" if egress else "inbound"
    for e in entries:
        if e["RuleAction"] == "deny" and _entry_cidr(e) == str(net) and e["Protocol"] == "-1":
            return None
    counted = [e for e in entries if e["RuleNumber"] != DEFAULT_RULE]
    if len(counted) >= settings.entry_limit:
        raise NaclRefused(
            f"{acl_id} {direction}: full ({len(counted)} of {settings.entry_limit} entries); "
            "unblock something, merge CIDRs, raise the quota (up to 40) and nacl.entry_limit, "
            "or block this address at WAF only")
    allows = [e["RuleNumber"] for e in entries
              if e["RuleAction"] == "allow" and e["RuleNumber"] != DEFAULT_RULE]
    ceiling = min(allows) if allows else DEFAULT_RULE
    used = {e["RuleNumber"] for e in entries}
    for n in range(settings.first_rule, ceiling):
        if n not in used:
            return NaclSlot(acl_id, egress, n)
    raise NaclRefused(
        f"{acl_id} {direction}: no free rule number in {settings.first_rule}..{ceiling - 1} "
        f"below the first allow rule {ceiling}; renumber the allow rules higher (e.g. from 100) "
        "or lower nacl.first_rule")


def place(ec2: Any, slot: NaclSlot, net: Network, settings: NaclSettings,
          attempts: int = 5) -> NaclSlot:
    """Create the deny entry; if someone took the number meanwhile, take the next free one."""
    for _ in range(attempts):
        cidr_arg = {"CidrBlock" if net.version == 4 else "Ipv6CidrBlock": str(net)}
        try:
            ec2.create_network_acl_entry(NetworkAclId=slot.acl_id, RuleNumber=slot.rule,
                                         Protocol="-1", RuleAction="deny", Egress=slot.egress,
                                         **cidr_arg)
            return slot
        except ClientError as e:
            if e.response["Error"]["Code"] != "NetworkAclEntryAlreadyExists":
                raise
        again = free_slot(ec2, slot.acl_id, slot.egress, net, settings)
        if again is None:  # a concurrent block of the same CIDR got there first
            raise NaclRefused(f"{slot.acl_id}: {net} was denied concurrently by someone else")
        slot = again
    raise NaclRefused(f"{slot.acl_id}: rule numbers kept being taken; try again")


def remove(ec2: Any, placement: dict[str, Any], cidr: str) -> str:
    """Delete the entry the guard placed; leave it if it is no longer ours. Returns a note."""
    acl_id, egress, rule = placement["acl"], placement["egress"], placement["rule"]
    try:
        entries = _entries(ec2, acl_id, egress)
    except ClientError as e:
        if "NotFound" in e.response["Error"]["Code"]:
            return f"{acl_id} is gone; nothing to remove"
        raise
    entry = next((e for e in entries if e["RuleNumber"] == rule), None)
    if entry is None:
        return f"{acl_id} rule {rule} was already removed"
    if entry["RuleAction"] != "deny" or _entry_cidr(entry) != canonical(cidr):
        return (f"{acl_id} rule {rule} now holds {entry['RuleAction']} "
                f"{_entry_cidr(entry)}, not the guard's deny of {cidr}; left alone")
    ec2.delete_network_acl_entry(NetworkAclId=acl_id, RuleNumber=rule, Egress=egress)
    return f"{acl_id} {'outbound' if egress else 'inbound'} rule {rule} removed"
