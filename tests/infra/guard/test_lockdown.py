"""Security groups cannot deny: audit world-open sensitive ingress, lock it down, undo exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from infra.guard.service import Guard, GuardRefused
from tests.conftest import REPO
from tests.infra.guard.support import ADMIN, make_net


def _perms(ec2, group):
    perms = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["IpPermissions"]
    return sorted(json.dumps({k: (sorted(v, key=json.dumps) if isinstance(v, list) else v)
                              for k, v in p.items()}, sort_keys=True) for p in perms)


def test_audit_lockdown_and_exact_undo(aws, tmp_path) -> None:
    net = make_net(aws, tmp_path)
    ec2 = net.aws.client("ec2")
    sg = net.groups[0]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "ssh from anywhere"},
                      {"CidrIp": ADMIN, "Description": "admins"}],  # already allowed
         "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
        {"IpProtocol": "tcp", "FromPort": 6817, "ToPort": 6819,
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,  # the portal: not sensitive
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    original = _perms(ec2, sg)
    g = Guard(net.aws, net.cfg)
    g.registry.ensure()

    found = {(f.from_port, f.cidr, tuple(f.ports)) for f in g.audit()}
    assert found == {(22, "0.0.0.0/0", (22,)), (22, "::/0", (22,)),
                     (6817, "0.0.0.0/0", (6817, 6818, 6819))}

    lid, record = g.lockdown([ADMIN, "2001:db8:a::/48"])
    assert g.audit() == []
    after = ec2.describe_security_groups(GroupIds=[sg])["SecurityGroups"][0]["IpPermissions"]
    by_port = {p["FromPort"]: p for p in after}
    assert {r["CidrIp"] for r in by_port[22]["IpRanges"]} == {ADMIN}
    assert {r["CidrIpv6"] for r in by_port[22]["Ipv6Ranges"]} == {"2001:db8:a::/48"}
    assert {r["CidrIp"] for r in by_port[6817]["IpRanges"]} == {ADMIN}
    assert {r["CidrIp"] for r in by_port[443]["IpRanges"]} == {"0.0.0.0/0"}
    # ADMIN already had port 22: not recorded as added, so the undo keeps it.
    added = {(c["rule"]["from_port"], r.get("CidrIp") or r.get("CidrIpv6"))
             for c in record["changes"] for p in c["added"]
             for r in p.get("IpRanges", []) + p.get("Ipv6Ranges", [])}
    assert added == {(22, "2001:db8:a::/48"), (6817, ADMIN)}

    undone, notes = g.undo_lockdown()
    assert undone == lid and len(notes) == 5
    assert _perms(ec2, sg) == original  # descriptions included
    with pytest.raises(GuardRefused, match="no lockdown"):
        g.undo_lockdown()


def test_cli_audit_exit_codes_and_lockdown_undo(aws, tmp_path) -> None:
    net = make_net(aws, tmp_path)
    ec2 = net.aws.client("ec2")
    ec2.authorize_security_group_ingress(GroupId=net.groups[0], IpPermissions=[
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    original = _perms(ec2, net.groups[0])
    env = {**os.environ, "AWS_ENDPOINT_URL": net.aws.endpoint_url,
           "CLUSTERFLOW_GUARD_CONFIG": str(net.config_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "infra.guard.cli", *args], cwd=REPO,
                              env=env, text=True, capture_output=True, timeout=120)

    res = cli("audit", "--json")
    assert res.returncode == 1  # something is open
    [hit] = json.loads(res.stdout)["open"]
    assert hit["protocol"] == "-1" and hit["ports"] == net.cfg.sensitive_ports
    assert cli("lockdown", "--allow", "0.0.0.0/0").returncode == 2
    res = cli("lockdown", "--allow", ADMIN)
    assert res.returncode == 0 and "undo: clusterflow guard lockdown --undo" in res.stdout
    assert cli("audit").returncode == 0
    res = cli("lockdown", "--undo", "--json")
    assert res.returncode == 0, res.stderr
    assert _perms(ec2, net.groups[0]) == original
