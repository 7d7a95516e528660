"""block / unblock / list / sweep / lockdown across the configured layers, recorded.

A block is planned before anything changes: every NACL must have a free rule number under its
allow rules and room under its entry limit, the CIDR must not touch the allowlist, the WAF IP
sets must exist. Only then are entries placed; if one placement fails the ones already made
are taken back, so a refused or failed block leaves nothing behind.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from infra.aws.clients import AwsTarget
from infra.guard import nacl, security_groups
from infra.guard.alerts import publish, topic_arn
from infra.guard.cidr import Network, allowlisted, parse_cidr
from infra.guard.config import GuardConfig
from infra.guard.registry import AlreadyBlocked, BlockRecord, Registry
from infra.guard.waf import Waf, layer_reason

NACL_REASON = ("subnet network ACL: SSH and Slurm traffic reaches the head/login nodes "
               "directly, from the client's own address")


class GuardRefused(RuntimeError):
    """The request is refused before anything changed (exit 2)."""


@dataclass
class BlockResult:
    record: BlockRecord
    already: bool = False
    extended: bool = False  # already blocked, and the new TTL ran longer: expiry moved out
    layers: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    alert_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**self.record.as_dict(), "already_blocked": self.already,
                "expiry_extended": self.extended,
                "layers": self.layers, "notes": self.notes, "alert_error": self.alert_error}


class Guard:
    def __init__(self, aws: AwsTarget, cfg: GuardConfig) -> None:
        self.aws, self.cfg = aws, cfg
        self.ec2 = aws.client("ec2")
        self.registry = Registry(aws, cfg.registry_table)
        self.waf = Waf(aws, cfg)
        self._identity: dict[str, str] | None = None
        self._vpc_cidrs: list[Network] | None = None

    # who / where
    def identity(self) -> dict[str, str]:
        if self._identity is None:
            self._identity = self.aws.client("sts").get_caller_identity()
        return self._identity

    @property
    def alerts_arn(self) -> str:
        return topic_arn(self.aws, self.cfg.alerts_topic, self.identity()["Account"])

    def vpc_cidrs(self) -> list[Network]:
        if self._vpc_cidrs is None:
            nets: list[Network] = []
            if self.cfg.allow_vpc_cidrs and self.cfg.subnets:
                subnets = self.ec2.describe_subnets(SubnetIds=self.cfg.subnets)["Subnets"]
                vpcs = sorted({s["VpcId"] for s in subnets})
                for vpc in self.ec2.describe_vpcs(VpcIds=vpcs)["Vpcs"]:
                    for a in vpc.get("CidrBlockAssociationSet", []):
                        nets.append(parse_cidr(a["CidrBlock"]))
                    for a in vpc.get("Ipv6CidrBlockAssociationSet", []):
                        nets.append(parse_cidr(a["Ipv6CidrBlock"]))
            self._vpc_cidrs = nets
        return self._vpc_cidrs

    def check_allowed(self, net: Network) -> None:
        hit = allowlisted(net, [*self.cfg.allowlist_networks(), *self.vpc_cidrs()])
        if hit is not None:
            raise GuardRefused(f"{net} overlaps the allowlisted {hit} (admin network, VPC CIDR "
                               "or everything); the guard never blocks it")

    # setup
    def init(self) -> list[str]:
        """Registry table, WAF IP sets and block rules; checks the subnets have NACLs."""
        self.registry.ensure()
        notes = [f"registry table {self.cfg.registry_table}"]
        notes += self.waf.ensure()
        for acl, subnets in nacl.acls_for_subnets(self.ec2, self.cfg.subnets).items():
            notes.append(f"NACL {acl} guards {', '.join(subnets)}")
        return notes

    # block / unblock
    def block(self, cidr: str, ttl_s: int | None, reason: str, *, source: str = "cli",
              by: str | None = None) -> BlockResult:
        net = parse_cidr(cidr)
        self.check_allowed(net)
        if not self.cfg.subnets and not self.cfg.web_acls:
            raise GuardRefused("the guard config names no subnets and no web_acls: nothing "
                               "to block at")
        acls = nacl.acls_for_subnets(self.ec2, self.cfg.subnets)
        now = time.time()
        record = BlockRecord(cidr=str(net), reason=reason, by=by or self.identity()["Arn"],
                             created=now, expires=None if ttl_s is None else now + ttl_s,
                             source=source)
        try:
            self.registry.claim(record)
        except AlreadyBlocked as e:
            return self._extend(e.record, record.expires)
        try:
            slots = self._plan(net, acls)
            for scope in self.waf.scopes:
                self.waf.ip_set(scope, net.version)  # exists, or refuse before placing
        except Exception:
            self.registry.release(record.cidr)
            raise
        result = BlockResult(record)
        try:
            # Write-ahead: each placement is recorded before it is made, so whatever a dead
            # blocker left is listed (removing an entry that was never made is a no-op).
            for slot in slots:
                record.placements.append(slot.placement(acls[slot.acl_id]))
                self.registry.progress(record)
                placed = nacl.place(self.ec2, slot, net, self.cfg.nacl)
                record.placements[-1] = placed.placement(acls[placed.acl_id])
            for scope in self.waf.scopes:
                record.placements.append(self.waf.placement(scope, net))
                self.registry.progress(record)
                self.waf.add(scope, net)
        except Exception:
            self._take_back(record, net)
            self.registry.release(record.cidr)
            raise
        self.registry.activate(record)
        result.layers = self._layers(record)
        result.alert_error = publish(self.aws, self.alerts_arn, "Guard Block Added",
                                     record.as_dict())
        return result

    def _extend(self, existing: BlockRecord, expires: float | None) -> BlockResult:
        """A repeat of an ongoing attack keeps the block up at least as long as it asks for;
        the entries are untouched and nothing is published (it is the same block)."""
        later = existing.expires is not None and (expires is None or expires > existing.expires)
        if existing.state != "active" or not later:
            return BlockResult(existing, already=True)
        existing.expires = expires
        self.registry.save(existing)
        return BlockResult(existing, already=True, extended=True)

    def _plan(self, net: Network, acls: dict[str, list[str]]) -> list[nacl.NaclSlot]:
        slots = []
        directions = (False, True) if self.cfg.nacl.outbound else (False,)
        for acl_id in acls:
            for egress in directions:
                slot = nacl.free_slot(self.ec2, acl_id, egress, net, self.cfg.nacl)
                if slot is not None:
                    slots.append(slot)
        return slots

    def _layers(self, record: BlockRecord) -> list[dict[str, str]]:
        layers = []
        for p in record.placements:
            if p["layer"] == "nacl":
                layers.append({"layer": "nacl",
                               "where": f"{p['acl']} {'outbound' if p['egress'] else 'inbound'}"
                                        f" rule {p['rule']} ({', '.join(p['subnets'])})",
                               "why": NACL_REASON})
            else:
                for ref in (w for w in self.cfg.web_acls if w.scope == p["scope"]):
                    layers.append({"layer": f"waf-{p['scope'].lower()}",
                                   "where": f"web ACL {ref.name} via IP set {p['ip_set']} "
                                            f"({p['region']})",
                                   "why": layer_reason(ref)})
        return layers

    def _take_back(self, record: BlockRecord, net: Network) -> list[str]:
        notes = []
        for p in reversed(record.placements):
            if p["layer"] == "nacl":
                notes.append(nacl.remove(self.ec2, p, str(net)))
            else:
                notes.append(self.waf.remove(p, net))
        return notes

    def unblock(self, cidr: str, *, by: str | None = None, reason: str = "unblocked"
                ) -> BlockResult:
        net = parse_cidr(cidr)
        record = self.registry.get(str(net))
        if record is None:
            raise GuardRefused(f"{net} is not blocked by the guard (see `clusterflow guard "
                               "list`)")
        notes = self._take_back(record, net)
        self.registry.release(record.cidr)
        detail = {**record.as_dict(), "removed_by": by or self.identity()["Arn"],
                  "removal_reason": reason, "notes": notes}
        err = publish(self.aws, self.alerts_arn, "Guard Block Removed", detail)
        return BlockResult(record, notes=notes, alert_error=err)

    def blocks(self) -> list[BlockRecord]:
        return self.registry.blocks()

    def sweep(self) -> list[BlockResult]:
        """Unblock every active block whose expiry has passed, and take back what a block
        that died half-way (pending, its lease over) had placed."""
        done = []
        for r in self.registry.blocks():
            if r.state == "active" and r.expired:
                done.append(self.unblock(r.cidr, by="clusterflow guard sweep",
                                         reason="expired"))
            elif r.abandoned:
                done.append(self.unblock(r.cidr, by="clusterflow guard sweep",
                                         reason="abandoned half-way (the blocker died)"))
        return done

    # security groups
    def audit(self) -> list[security_groups.OpenRule]:
        if not self.cfg.security_groups:
            raise GuardRefused("the guard config names no security_groups to audit")
        return security_groups.audit(self.ec2, self.cfg.security_groups,
                                     self.cfg.sensitive_ports)

    def lockdown(self, allow: list[str]) -> tuple[str, dict[str, Any]]:
        if not allow:
            raise GuardRefused("lockdown needs at least one --allow CIDR")
        nets = [parse_cidr(a) for a in allow]
        for n in nets:
            if n.prefixlen == 0:
                raise GuardRefused(f"--allow {n} is the whole internet; lockdown would "
                                   "change nothing")
        self.audit()  # refuses an empty security_groups
        lockdown_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        record = security_groups.lockdown(
            self.ec2, self.cfg.security_groups, self.cfg.sensitive_ports,
            [str(n) for n in nets], f"clusterflow guard lockdown {lockdown_id}")
        record["by"] = self.identity()["Arn"]
        self.registry.put_lockdown(lockdown_id, record)
        return lockdown_id, record

    def undo_lockdown(self, lockdown_id: str | None = None) -> tuple[str, list[str]]:
        rows = self.registry.lockdowns()
        if lockdown_id is not None:
            rows = [r for r in rows if r[0] == lockdown_id]
        if not rows:
            raise GuardRefused(f"no lockdown {lockdown_id or ''} recorded to undo".replace(
                "  ", " "))
        lid, _, record = rows[-1]
        notes = security_groups.undo(self.ec2, record)
        self.registry.delete_lockdown(lid)
        return lid, notes
