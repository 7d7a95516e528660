"""block / unblock / list on real NACLs and WAF IP sets (REGIONAL and CLOUDFRONT) over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from infra.aws.clients import AwsTarget
from infra.guard.cidr import canonical
from infra.guard.nacl import NaclRefused
from infra.guard.service import Guard, GuardRefused
from infra.guard.waf import WafRefused
from tests.conftest import REPO
from tests.infra.guard.support import ADMIN, make_net


def _denies(net, acl):
    return {(e["Egress"], e["RuleNumber"], e.get("CidrBlock") or e.get("Ipv6CidrBlock"))
            for e in net.entries(acl) if e["RuleAction"] == "deny"}


def test_block_unblock_list_round_trip_ipv4_and_ipv6(aws: AwsTarget, tmp_path) -> None:
    net = make_net(aws, tmp_path)
    g = Guard(net.aws, net.cfg)
    notes = g.init()
    assert any("guards" in n for n in notes)
    before = {acl: net.entries(acl) for acl in (net.shared_acl, net.own_acl)}

    r4 = g.block("203.0.113.7", 3600, "ssh brute force")
    r6 = g.block("2001:db8:dead::/48", None, "port scan")
    for acl in (net.shared_acl, net.own_acl):  # in and out, below the allow rules at 100
        assert _denies(net, acl) == {(False, 1, "203.0.113.7/32"), (True, 1, "203.0.113.7/32"),
                                     (False, 2, "2001:db8:dead::/48"),
                                     (True, 2, "2001:db8:dead::/48")}
    for scope in ("REGIONAL", "CLOUDFRONT"):
        assert net.addresses(scope, 4) == ["203.0.113.7/32"]
        assert net.addresses(scope, 6) == ["2001:db8:dead::/48"]
    # CLOUDFRONT lives in us-east-1 whatever the cluster's region (us-west-2 here).
    assert {p["region"] for p in r4.record.placements if p["layer"] == "waf"} == {
        "us-west-2", "us-east-1"}
    # The shared NACL is listed once with both subnets it guards.
    shared = [p for p in r4.record.placements if p["layer"] == "nacl"
              and p["acl"] == net.shared_acl]
    assert len(shared) == 2 and shared[0]["subnets"] == net.subnets[:2]
    layers = {(la["layer"], la["why"][:20]) for la in r4.layers}
    assert {la for la, _ in layers} == {"nacl", "waf-regional", "waf-cloudfront"}
    assert any("viewer's own address" in la["why"] for la in r4.layers)

    listed = {b.cidr: b for b in g.blocks()}
    assert set(listed) == {"203.0.113.7/32", "2001:db8:dead::/48"}
    assert listed["203.0.113.7/32"].reason == "ssh brute force"
    assert listed["203.0.113.7/32"].by.startswith("arn:aws:")
    assert listed["203.0.113.7/32"].expires == pytest.approx(r4.record.created + 3600)
    assert listed["2001:db8:dead::/48"].expires is None and r6.record.state == "active"

    # A second block of the same address changes nothing.
    again = g.block("203.0.113.7/32", 60, "again")
    assert again.already and not again.extended and len(_denies(net, net.shared_acl)) == 4
    # ... except that a longer TTL keeps the block up longer (a continuing attack).
    longer = g.block("203.0.113.7", 7200, "again")
    assert longer.extended and longer.record.reason == "ssh brute force"
    assert g.registry.get("203.0.113.7/32").expires == pytest.approx(time.time() + 7200, abs=5)
    assert len(_denies(net, net.shared_acl)) == 4

    g.unblock("203.0.113.7")
    g.unblock("2001:db8:dead::/48")
    assert {acl: net.entries(acl) for acl in before} == before  # exactly what it added
    for scope in ("REGIONAL", "CLOUDFRONT"):
        assert net.addresses(scope, 4) == [] and net.addresses(scope, 6) == []
    assert g.blocks() == []
    kinds = [(a["detail-type"], a["detail"]["cidr"]) for a in net.alerts()]
    assert sorted(kinds) == sorted([
        ("Guard Block Added", "203.0.113.7/32"), ("Guard Block Added", "2001:db8:dead::/48"),
        ("Guard Block Removed", "203.0.113.7/32"), ("Guard Block Removed", "2001:db8:dead::/48")])
    with pytest.raises(GuardRefused, match="not blocked"):
        g.unblock("203.0.113.7")


def test_web_acl_keeps_its_rules_and_behind_cloudfront_matches_the_forwarded_header(
        aws: AwsTarget, tmp_path) -> None:
    net = make_net(aws, tmp_path)
    cfg = net.cfg.model_copy(update={"web_acls": [
        net.cfg.web_acls[0].model_copy(update={"behind_cloudfront": True}),
        net.cfg.web_acls[1]]})
    g = Guard(net.aws, cfg)
    g.init()
    g.init()  # idempotent
    waf = net.aws.client("wafv2")
    summary = next(w for w in waf.list_web_acls(Scope="REGIONAL", Limit=100)["WebACLs"]
                   if w["Name"] == f"alb-{net.t}")
    rules = waf.get_web_acl(Name=summary["Name"], Scope="REGIONAL", Id=summary["Id"]
                            )["WebACL"]["Rules"]
    assert [r["Name"] for r in rules] == [cfg.rule_name, "rate"]  # the portal's own rule kept
    refs = rules[0]["Statement"]["OrStatement"]["Statements"]
    assert [s["IPSetReferenceStatement"]["IPSetForwardedIPConfig"]["HeaderName"]
            for s in refs] == ["X-Forwarded-For"] * 2
    assert rules[0]["Action"] == {"Block": {}}
    r = g.block("192.0.2.9", 60, "scraper")
    why = {la["layer"]: la["why"] for la in r.layers}
    assert "CloudFront's addresses" in why["waf-regional"]
    g.unblock("192.0.2.9")

    clash = cfg.model_copy(update={"web_acls": [
        cfg.web_acls[0].model_copy(update={"priority": 10})]})
    with pytest.raises(WafRefused, match="priority 10 is taken by rule rate"):
        Guard(net.aws, clash).init()


def test_rule_numbers_never_collide_and_stay_below_the_allow_rules(aws, tmp_path) -> None:
    net = make_net(aws, tmp_path, nacl={"outbound": False})
    ec2 = net.aws.client("ec2")
    # Someone else's entries at 1 and 3, and an allow at 5.
    for n, action in ((1, "deny"), (3, "deny"), (5, "allow")):
        ec2.create_network_acl_entry(NetworkAclId=net.own_acl, RuleNumber=n, Protocol="6",
                                     RuleAction=action, Egress=False, CidrBlock=f"192.0.2.{n}/32",
                                     PortRange={"From": 22, "To": 22})
    g = Guard(net.aws, net.cfg)
    g.init()
    g.block("203.0.113.1", 60, "a")
    g.block("203.0.113.2", 60, "b")
    own = sorted((r, c) for egress, r, c in _denies(net, net.own_acl) if not egress)
    assert own == [(1, "192.0.2.1/32"), (2, "203.0.113.1/32"), (3, "192.0.2.3/32"),
                   (4, "203.0.113.2/32")]
    with pytest.raises(NaclRefused, match=rf"{net.own_acl} inbound: no free rule number in "
                                          r"1\.\.4 below the first allow rule 5"):
        g.block("203.0.113.3", 60, "c")
    assert net.addresses("REGIONAL", 4) == ["203.0.113.1/32", "203.0.113.2/32"]
    assert {b.cidr for b in g.blocks()} == {"203.0.113.1/32", "203.0.113.2/32"}
    # Unblock leaves the foreign entries alone.
    g.unblock("203.0.113.1")
    assert (False, 1, "192.0.2.1/32") in _denies(net, net.own_acl)


def test_a_full_nacl_is_refused_and_nothing_changes(aws, tmp_path) -> None:
    net = make_net(aws, tmp_path)
    ec2 = net.aws.client("ec2")
    for n in range(200, 218):  # 18 + the two allows = 20 inbound entries
        ec2.create_network_acl_entry(NetworkAclId=net.own_acl, RuleNumber=n, Protocol="-1",
                                     RuleAction="allow", Egress=False,
                                     CidrBlock=f"10.99.{n - 200}.0/24")
    g = Guard(net.aws, net.cfg)
    g.init()
    before = {acl: net.entries(acl) for acl in (net.shared_acl, net.own_acl)}
    with pytest.raises(NaclRefused, match=rf"{net.own_acl} inbound: full \(20 of 20 entries\)"):
        g.block("203.0.113.50", 60, "x")
    assert {acl: net.entries(acl) for acl in before} == before
    assert net.addresses("REGIONAL", 4) == [] and net.addresses("CLOUDFRONT", 4) == []
    assert g.blocks() == [] and net.alerts() == []

    # The CLI says so in one line and exits 2.
    env = {**os.environ, "AWS_ENDPOINT_URL": net.aws.endpoint_url}
    res = subprocess.run([sys.executable, "-m", "infra.guard.cli", "block", "203.0.113.50",
                          "--config", str(net.config_path)], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().startswith("error:") and "full (20 of 20" in res.stderr
    assert "Traceback" not in res.stderr
    assert {acl: net.entries(acl) for acl in before} == before


def test_allowlisted_cidrs_are_refused(aws, tmp_path) -> None:
    net = make_net(aws, tmp_path)
    g = Guard(net.aws, net.cfg)
    g.init()
    for cidr, hit in (("198.51.100.20", ADMIN), ("198.51.0.0/16", ADMIN),  # in/around admin
                      ("10.42.3.4", "10.42.0.0/16"), ("10.0.0.0/8", "10.42.0.0/16"),  # the VPC
                      # its IPv6 block, looked up (moto may write a group with a leading zero,
                      # "03a8"; the guard names networks as Python writes them)
                      (net.vpc_v6.split("/")[0], canonical(net.vpc_v6)),
                      ("0.0.0.0/0", "0.0.0.0/0"), ("::/0", "::/0")):
        with pytest.raises(GuardRefused, match=f"overlaps the allowlisted {hit}"):
            g.block(cidr, 60, "x")
    assert g.blocks() == [] and _denies(net, net.shared_acl) == set()
    assert net.addresses("REGIONAL", 4) == [] and net.alerts() == []


def test_cli_block_list_unblock(aws, tmp_path) -> None:
    net = make_net(aws, tmp_path)
    env = {**os.environ, "AWS_ENDPOINT_URL": net.aws.endpoint_url,
           "CLUSTERFLOW_GUARD_CONFIG": str(net.config_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "infra.guard.cli", *args], cwd=REPO,
                              env=env, text=True, capture_output=True, timeout=120)

    res = cli("block", "203.0.113.99", "--ttl", "2h", "--reason", "from the SOC")
    assert res.returncode == 0, res.stderr
    assert "blocked 203.0.113.99/32 until" in res.stdout
    assert "nacl:" in res.stdout and "waf-cloudfront:" in res.stdout and "why:" in res.stdout
    listed = json.loads(cli("list", "--json").stdout)["blocks"]
    assert [(b["cidr"], b["reason"]) for b in listed] == [("203.0.113.99/32", "from the SOC")]
    assert cli("block", "203.0.113.99", "--ttl", "soon").returncode == 2
    res = cli("unblock", "203.0.113.99", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["cidr"] == "203.0.113.99/32"
    assert json.loads(cli("list", "--json").stdout)["blocks"] == []
    bad = cli("block", "203.0.113.99/24")
    assert bad.returncode == 2 and "did you mean 203.0.113.0/24" in bad.stderr


class _Died(BaseException):
    """The blocking process is killed mid-way (nothing in it gets to clean up)."""


def test_a_failed_block_takes_back_its_entries_and_a_dead_one_is_swept(aws, tmp_path) -> None:
    net = make_net(aws, tmp_path)
    g = Guard(net.aws, net.cfg)
    g.init()
    before = {acl: net.entries(acl) for acl in (net.shared_acl, net.own_acl)}
    real_add = g.waf.add

    def failing_add(scope, address):
        if scope == "REGIONAL":
            raise RuntimeError("WAF is down")
        return real_add(scope, address)

    g.waf.add = failing_add  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="WAF is down"):
        g.block("203.0.113.80", 60, "x")
    assert {acl: net.entries(acl) for acl in before} == before
    assert net.addresses("CLOUDFRONT", 4) == [] and g.blocks() == []

    def dying_add(scope, address):
        real_add(scope, address)
        raise _Died

    g.waf.add = dying_add  # type: ignore[method-assign]
    with pytest.raises(_Died):
        g.block("203.0.113.81", 60, "x")
    [pending] = g.blocks()
    assert pending.state == "pending" and len(pending.placements) == 5  # 4 NACL + 1 WAF
    g.waf.add = real_add  # type: ignore[method-assign]
    assert g.block("203.0.113.81", 60, "again").already  # its claimer may still be at work
    assert g.sweep() == []  # ... until its lease runs out
    pending.lease_until = time.time() - 1
    g.registry.progress(pending)
    [swept] = g.sweep()
    assert swept.record.cidr == "203.0.113.81/32" and g.blocks() == []
    assert {acl: net.entries(acl) for acl in before} == before
    assert net.addresses("CLOUDFRONT", 4) == [] and net.addresses("REGIONAL", 4) == []


def test_a_block_stored_in_another_spelling_is_the_same_block(aws, tmp_path) -> None:
    # AWS hands a CIDR back as it was stored: a deny written by hand (or by another tool) as
    # 2001:0db8:00be::/48 is the guard's 2001:db8:be::/48, so the guard neither adds a second
    # entry nor a second WAF address, and its unblock removes the WAF address it finds.
    net = make_net(aws, tmp_path)
    g = Guard(net.aws, net.cfg)
    g.init()
    ec2 = net.aws.client("ec2")
    spelled = "2001:0db8:00be::/48"
    for egress in (False, True):
        ec2.create_network_acl_entry(NetworkAclId=net.shared_acl, RuleNumber=7, Protocol="-1",
                                     RuleAction="deny", Egress=egress, Ipv6CidrBlock=spelled)
    before = net.entries(net.shared_acl)
    g.block("2001:db8:be::/48", None, "scan")
    assert net.entries(net.shared_acl) == before  # already denied there
    assert {c for _, _, c in _denies(net, net.own_acl)} == {"2001:db8:be::/48"}
    waf = net.aws.client("wafv2")
    name = net.cfg.ip_set_name(6)
    ref = next(s for s in waf.list_ip_sets(Scope="REGIONAL", Limit=100)["IPSets"]
               if s["Name"] == name)
    got = waf.get_ip_set(Name=name, Scope="REGIONAL", Id=ref["Id"])
    waf.update_ip_set(Name=name, Scope="REGIONAL", Id=ref["Id"], Addresses=[spelled],
                      LockToken=got["LockToken"])
    g.unblock("2001:db8:be::/48")
    assert net.addresses("REGIONAL", 6) == []
    assert canonical("2400:6500:03a8:6900::/56") == "2400:6500:3a8:6900::/56"
    assert canonical("not a cidr") == "not a cidr" and canonical(None) is None
