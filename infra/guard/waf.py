"""WAF IP sets, referenced by one block rule in each configured web ACL.

One IP set per scope and IP version (WAF IP sets hold one version each), shared by every web
ACL of that scope: ``<prefix>-v4`` and ``<prefix>-v6``. The guard owns them: every address in
them belongs to one block in the registry (add addresses with ``guard block``, not by hand).
Each web ACL gets one rule, ``<prefix>-block``, that blocks a request whose address is in
either set. Which address:

* a CLOUDFRONT web ACL is evaluated by CloudFront itself and sees the viewer's address;
* a REGIONAL web ACL on an ALB that clients reach directly sees the client's address;
* a REGIONAL web ACL on an ALB *behind* CloudFront sees only CloudFront's edge addresses, so
  its rule matches the first address of the forwarded-IP header (``X-Forwarded-For``) instead.

CLOUDFRONT resources exist only in us-east-1, whatever region the cluster is in: their client
is always built for us-east-1. Every update carries WAF's lock token and is retried when
someone else changed the resource in between (WAFOptimisticLockException).
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from infra.aws.clients import AwsTarget
from infra.guard.cidr import Network, canonical
from infra.guard.config import GuardConfig, WebAclRef

CLOUDFRONT_REGION = "us-east-1"


class WafRefused(RuntimeError):
    """A web ACL or IP set is missing or cannot take the rule; the message says which."""


def layer_reason(ref: WebAclRef) -> str:
    if ref.scope == "CLOUDFRONT":
        return ("WAF on CloudFront: it evaluates the viewer's own address before the request "
                "reaches an origin, where only CloudFront's addresses are seen")
    if ref.behind_cloudfront:
        return (f"WAF on the ALB, matching {ref.forwarded_ip_header}: behind CloudFront the "
                "ALB (and its subnet's NACL) see CloudFront's addresses, so the client's "
                "address is taken from the forwarded-IP header")
    return "WAF on the ALB: clients reach it directly, so it sees their address"


class Waf:
    def __init__(self, aws: AwsTarget, cfg: GuardConfig) -> None:
        self.aws, self.cfg = aws, cfg

    def region(self, scope: str) -> str:
        return CLOUDFRONT_REGION if scope == "CLOUDFRONT" else self.cfg.region

    def client(self, scope: str) -> Any:
        target = AwsTarget(region=self.region(scope), endpoint_url=self.aws.endpoint_url,
                           embedded=self.aws.embedded)
        return target.client("wafv2")

    @property
    def scopes(self) -> list[str]:
        return sorted({w.scope for w in self.cfg.web_acls})

    # lookups
    def _find(self, scope: str, kind: str, name: str) -> dict[str, Any] | None:
        waf = self.client(scope)
        op, key = ("list_ip_sets", "IPSets") if kind == "ipset" else ("list_web_acls", "WebACLs")
        kwargs: dict[str, Any] = {"Scope": scope, "Limit": 100}
        while True:
            page = getattr(waf, op)(**kwargs)
            for item in page.get(key, []):
                if item["Name"] == name:
                    return item
            if not page.get("NextMarker") or not page.get(key):
                return None
            kwargs["NextMarker"] = page["NextMarker"]

    def ip_set(self, scope: str, version: int) -> dict[str, Any]:
        name = self.cfg.ip_set_name(version)
        found = self._find(scope, "ipset", name)
        if found is None:
            raise WafRefused(f"WAF IP set {name} ({scope}, {self.region(scope)}) does not "
                             "exist: run `clusterflow guard init`")
        return found

    # setup (guard init / an interactive block): IP sets and the rule in every web ACL
    def ensure(self) -> list[str]:
        notes = []
        for scope in self.scopes:
            waf = self.client(scope)
            arns = []
            for version in (4, 6):
                name = self.cfg.ip_set_name(version)
                found = self._find(scope, "ipset", name)
                if found is None:
                    found = waf.create_ip_set(
                        Name=name, Scope=scope, IPAddressVersion=f"IPV{version}", Addresses=[],
                        Description="clusterflow guard: blocked addresses (guard list)")["Summary"]
                    notes.append(f"created IP set {name} ({scope})")
                arns.append(found["ARN"])
            for ref in (w for w in self.cfg.web_acls if w.scope == scope):
                notes.extend(self._ensure_rule(ref, arns))
        return notes

    def _statement(self, ref: WebAclRef, arns: list[str]) -> dict[str, Any]:
        refs = []
        for arn in arns:
            st: dict[str, Any] = {"ARN": arn}
            if ref.behind_cloudfront:
                st["IPSetForwardedIPConfig"] = {"HeaderName": ref.forwarded_ip_header,
                                                "FallbackBehavior": "MATCH",
                                                "Position": "FIRST"}
            refs.append({"IPSetReferenceStatement": st})
        return {"OrStatement": {"Statements": refs}}

    def _ensure_rule(self, ref: WebAclRef, arns: list[str], attempts: int = 5) -> list[str]:
        waf = self.client(ref.scope)
        summary = self._find(ref.scope, "webacl", ref.name)
        if summary is None:
            raise WafRefused(f"web ACL {ref.name} ({ref.scope}, {self.region(ref.scope)}) does "
                             "not exist; fix web_acls in the guard config")
        for _ in range(attempts):
            got = waf.get_web_acl(Name=ref.name, Scope=ref.scope, Id=summary["Id"])
            acl, token = got["WebACL"], got["LockToken"]
            rule = {"Name": self.cfg.rule_name, "Priority": ref.priority,
                    "Action": {"Block": {}}, "Statement": self._statement(ref, arns),
                    "VisibilityConfig": {"SampledRequestsEnabled": True,
                                         "CloudWatchMetricsEnabled": True,
                                         "MetricName": self.cfg.rule_name}}
            others = [r for r in acl.get("Rules", []) if r["Name"] != self.cfg.rule_name]
            clash = next((r for r in others if r["Priority"] == ref.priority), None)
            if clash is not None:
                raise WafRefused(f"web ACL {ref.name}: priority {ref.priority} is taken by rule "
                                 f"{clash['Name']}; set a free priority lower than your allow "
                                 "rules in web_acls")
            mine = next((r for r in acl.get("Rules", []) if r["Name"] == self.cfg.rule_name),
                        None)
            if mine is not None and mine.get("Statement") == rule["Statement"] \
                    and mine.get("Priority") == ref.priority:
                return []
            kwargs = {k: acl[k] for k in ("Description", "CustomResponseBodies", "CaptchaConfig",
                                          "ChallengeConfig", "TokenDomains",
                                          "AssociationConfig") if acl.get(k)}
            try:
                waf.update_web_acl(Name=ref.name, Scope=ref.scope, Id=summary["Id"],
                                   DefaultAction=acl["DefaultAction"],
                                   Rules=sorted([*others, rule], key=lambda r: r["Priority"]),
                                   VisibilityConfig=acl["VisibilityConfig"], LockToken=token,
                                   **kwargs)
                return [f"web ACL {ref.name} ({ref.scope}): rule {self.cfg.rule_name} "
                        f"at priority {ref.priority}"]
            except ClientError as e:
                if e.response["Error"]["Code"] != "WAFOptimisticLockException":
                    raise
        raise WafRefused(f"web ACL {ref.name}: kept changing under us; try again")

    # blocking
    def _update(self, scope: str, net: Network, add: bool, attempts: int = 5) -> bool:
        """Add/remove one address; False if it was already there/absent."""
        waf = self.client(scope)
        summary = self.ip_set(scope, net.version)
        for _ in range(attempts):
            got = waf.get_ip_set(Name=summary["Name"], Scope=scope, Id=summary["Id"])
            addresses = list(got["IPSet"]["Addresses"])
            # WAF hands addresses back as it stored them: compare canonical forms
            present = any(canonical(a) == str(net) for a in addresses)
            if present == add:
                return False
            addresses = ([*addresses, str(net)] if add
                         else [a for a in addresses if canonical(a) != str(net)])
            try:
                waf.update_ip_set(Name=summary["Name"], Scope=scope, Id=summary["Id"],
                                  Addresses=addresses, LockToken=got["LockToken"])
                return True
            except ClientError as e:
                if e.response["Error"]["Code"] != "WAFOptimisticLockException":
                    raise
        raise WafRefused(f"IP set {summary['Name']} ({scope}) kept changing under us; try again")

    def placement(self, scope: str, net: Network) -> dict[str, Any]:
        refs = [w for w in self.cfg.web_acls if w.scope == scope]
        return {"layer": "waf", "scope": scope, "region": self.region(scope),
                "ip_set": self.cfg.ip_set_name(net.version), "web_acls": [w.name for w in refs]}

    def add(self, scope: str, net: Network) -> bool:
        return self._update(scope, net, add=True)

    def remove(self, placement: dict[str, Any], net: Network) -> str:
        """The guard owns its IP sets: an address in one is there for its registry item."""
        removed = self._update(placement["scope"], net, add=False)
        return (f"IP set {placement['ip_set']} ({placement['scope']}): "
                f"{'removed' if removed else 'was already gone'}")
