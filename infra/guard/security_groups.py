"""Security groups cannot deny: audit world-open ingress, narrow it, and undo exactly that.

``audit`` lists ingress rules open to ``0.0.0.0/0`` or ``::/0`` that reach a sensitive port
(SSH, Slurm, databases). ``lockdown`` replaces each such rule by the same protocol and ports
from the allowlist CIDRs only and returns a record of what it revoked and what it added; a
rule an allow CIDR already had is not "added", so ``undo`` (which re-authorizes the revoked
rules and revokes the added ones) leaves the groups exactly as they were.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from botocore.exceptions import ClientError

from infra.guard.cidr import canonical, parse_cidr

WORLD = {4: "0.0.0.0/0", 6: "::/0"}


@dataclass(frozen=True)
class OpenRule:
    group: str
    group_name: str
    protocol: str
    from_port: int | None
    to_port: int | None
    cidr: str
    description: str | None
    ports: list[int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _covers(perm: dict[str, Any], port: int) -> bool:
    if perm["IpProtocol"] == "-1":
        return True
    if perm["IpProtocol"] not in ("tcp", "udp", "6", "17"):
        return False
    return perm.get("FromPort", 0) <= port <= perm.get("ToPort", 65535)


def audit(ec2: Any, groups: list[str], ports: list[int]) -> list[OpenRule]:
    found = []
    for sg in ec2.describe_security_groups(GroupIds=groups)["SecurityGroups"]:
        for perm in sg.get("IpPermissions", []):
            hit = [p for p in ports if _covers(perm, p)]
            if not hit:
                continue
            worlds = [(r["CidrIp"], r.get("Description")) for r in perm.get("IpRanges", [])
                      if canonical(r["CidrIp"]) == WORLD[4]]
            worlds += [(r["CidrIpv6"], r.get("Description")) for r in perm.get("Ipv6Ranges", [])
                       if canonical(r["CidrIpv6"]) == WORLD[6]]
            for cidr, desc in worlds:
                found.append(OpenRule(sg["GroupId"], sg.get("GroupName", ""),
                                      perm["IpProtocol"], perm.get("FromPort"),
                                      perm.get("ToPort"), cidr, desc, hit))
    return found


def _perm(protocol: str, from_port: int | None, to_port: int | None, cidr: str,
          description: str | None) -> dict[str, Any]:
    perm: dict[str, Any] = {"IpProtocol": protocol}
    if from_port is not None:
        perm["FromPort"], perm["ToPort"] = from_port, to_port
    rng: dict[str, Any] = ({"CidrIp": cidr} if parse_cidr(cidr).version == 4
                           else {"CidrIpv6": cidr})
    if description:
        rng["Description"] = description
    perm["IpRanges" if "CidrIp" in rng else "Ipv6Ranges"] = [rng]
    return perm


def lockdown(ec2: Any, groups: list[str], ports: list[int], allow: list[str],
             description: str) -> dict[str, Any]:
    """Narrow every world-open sensitive rule to ``allow``; the record undo() needs."""
    changes: list[dict[str, Any]] = []
    for rule in audit(ec2, groups, ports):
        version = parse_cidr(rule.cidr).version
        added = []
        for cidr in (c for c in allow if parse_cidr(c).version == version):
            perm = _perm(rule.protocol, rule.from_port, rule.to_port, cidr, description)
            try:
                ec2.authorize_security_group_ingress(GroupId=rule.group, IpPermissions=[perm])
                added.append(perm)
            except ClientError as e:
                if e.response["Error"]["Code"] != "InvalidPermission.Duplicate":
                    raise
        revoked = _perm(rule.protocol, rule.from_port, rule.to_port, rule.cidr,
                        rule.description)
        ec2.revoke_security_group_ingress(GroupId=rule.group, IpPermissions=[
            _perm(rule.protocol, rule.from_port, rule.to_port, rule.cidr, None)])
        changes.append({"group": rule.group, "revoked": revoked, "added": added,
                        "rule": rule.as_dict()})
    return {"groups": groups, "allow": allow, "changes": changes}


def undo(ec2: Any, record: dict[str, Any]) -> list[str]:
    """Put back what ``lockdown`` revoked, take away what it added, newest change first."""
    notes = []
    for change in reversed(record["changes"]):
        group = change["group"]
        try:
            ec2.authorize_security_group_ingress(GroupId=group,
                                                 IpPermissions=[change["revoked"]])
            notes.append(f"{group}: restored {_label(change['revoked'])}")
        except ClientError as e:
            if e.response["Error"]["Code"] != "InvalidPermission.Duplicate":
                raise
            notes.append(f"{group}: {_label(change['revoked'])} was already back")
        for perm in change["added"]:
            bare = {k: v for k, v in perm.items() if k not in ("IpRanges", "Ipv6Ranges")}
            for key, ck in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6")):
                if key in perm:
                    bare[key] = [{ck: r[ck]} for r in perm[key]]
            try:
                ec2.revoke_security_group_ingress(GroupId=group, IpPermissions=[bare])
                notes.append(f"{group}: removed {_label(perm)}")
            except ClientError as e:
                if e.response["Error"]["Code"] != "InvalidPermission.NotFound":
                    raise
    return notes


def _label(perm: dict[str, Any]) -> str:
    cidrs = [r.get("CidrIp") or r.get("CidrIpv6") for k in ("IpRanges", "Ipv6Ranges")
             for r in perm.get(k, [])]
    ports = ("all" if perm["IpProtocol"] == "-1"
             else f"{perm['IpProtocol']}/{perm.get('FromPort')}-{perm.get('ToPort')}")
    return f"{ports} from {', '.join(c for c in cidrs if c)}"
