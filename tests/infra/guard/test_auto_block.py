"""GuardDuty findings and CloudTrail network changes on EventBridge -> the guard handler in the
fabric -> blocked within seconds -> unblocked by the sweep once the TTL runs out."""

from __future__ import annotations

import copy
import json
import threading
import time
from typing import Any

import pytest

from event_bridge.apply import apply_fabric
from event_bridge.fabric import ConsumerSpec, DedupSpec, Fabric, QueueSpec, TargetSpec, load_fabric
from event_bridge.guard_handler import handle
from event_bridge.handlers import security_alert
from event_bridge.lambda_shapes import new_context
from event_bridge.service import consume
from infra.guard.service import Guard
from tests.infra.guard.support import ADMIN, make_net


def _finding_rule():
    return next(r for r in load_fabric().rules if r.name == "clusterflow-guardduty-findings")


def _finding(address: str, finding_id: str, count: int = 1,
             direction: str = "INBOUND") -> dict[str, Any]:
    """The rule's documented example (AWS's GuardDuty finding event shape), re-addressed."""
    event = copy.deepcopy(_finding_rule().examples.match[0])
    event["id"] = f"evt-{finding_id}-{count}"
    detail = event["detail"]
    detail["id"] = finding_id
    detail["service"]["count"] = count
    conn = detail["service"]["action"]["networkConnectionAction"]
    conn["remoteIpDetails"]["ipAddressV4"] = address
    conn["connectionDirection"] = direction
    return event


def _port_probe(addresses: list[str]) -> dict[str, Any]:
    event = copy.deepcopy(_finding_rule().examples.match[0])
    event["id"] = "evt-probe"
    event["detail"].update(id="probe-1", type="Recon:EC2/PortProbeUnprotectedPort")
    event["detail"]["service"]["action"] = {"actionType": "PORT_PROBE", "portProbeAction": {
        "blocked": False, "portProbeDetails": [
            {"localPortDetails": {"port": 6817, "portName": "Unknown"},
             "remoteIpDetails": {"ipAddressV4": a}} for a in addresses]}}
    return event


def _put(events_client, bus: str, event: dict[str, Any]) -> None:
    res = events_client.put_events(Entries=[{
        "Source": event["source"], "DetailType": event["detail-type"],
        "Detail": json.dumps(event["detail"]), "EventBusName": bus}])
    assert res["FailedEntryCount"] == 0


def _wait(predicate, timeout: float = 20.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_guardduty_finding_blocks_within_seconds_and_the_sweep_unblocks(
        aws, tmp_path, monkeypatch) -> None:
    net = make_net(aws, tmp_path, auto_block_ttl="3s")
    monkeypatch.setenv("CLUSTERFLOW_GUARD_CONFIG", str(net.config_path))
    g = Guard(net.aws, net.cfg)
    g.init()
    t = net.t
    rule = _finding_rule().model_copy(update={
        "name": f"gd-{t}", "bus": f"bus-{t}", "targets": [TargetSpec(queue=f"guard-{t}")]})
    fabric = Fabric(region=net.cfg.region, queues=[QueueSpec(name=f"guard-{t}")], rules=[rule],
                    consumers=[ConsumerSpec(queue=f"guard-{t}",
                                            handler="event_bridge.guard_handler:handle")],
                    dedup=DedupSpec(table=f"dedup-{t}"))
    apply_fabric(net.aws, fabric)  # also checks the documented finding against the pattern
    events = net.aws.client("events")
    stop = threading.Event()
    stats: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: stats.update(
        consume(net.aws, fabric, stop, wait_time_s=1)), daemon=True)
    worker.start()
    try:
        _put(events, f"bus-{t}", _finding("203.0.113.66", "f-1"))
        took = _wait(lambda: g.registry.get("203.0.113.66/32") is not None
                     and g.registry.get("203.0.113.66/32").state == "active")
        assert took < 10
        block = g.registry.get("203.0.113.66/32")
        assert "UnauthorizedAccess:EC2/SSHBruteForce" in block.reason
        assert "finding f-1" in block.by and block.source == "aws.guardduty"
        assert block.expires == pytest.approx(block.created + 3, abs=0.01)
        assert net.addresses("CLOUDFRONT", 4) == ["203.0.113.66/32"]
        assert len([e for e in net.entries(net.shared_acl) if e["RuleAction"] == "deny"]) == 2

        # GuardDuty re-publishes the ongoing finding: nothing changes.
        _put(events, f"bus-{t}", _finding("203.0.113.66", "f-1", count=40))
        # An outbound brute force (our instance attacking) blocks nobody; a port probe from
        # the admin network is refused and reported; the other prober is blocked.
        _put(events, f"bus-{t}", _finding("203.0.113.67", "f-2", direction="OUTBOUND"))
        _put(events, f"bus-{t}", _port_probe(["198.51.100.7", "192.0.2.44"]))
        _wait(lambda: g.registry.get("192.0.2.44/32") is not None)
        _wait(lambda: _drained(net))
        now = sorted((e["Egress"], e["CidrBlock"]) for e in net.entries(net.shared_acl)
                     if e["RuleAction"] == "deny")
        assert now == [(False, "192.0.2.44/32"), (False, "203.0.113.66/32"),
                       (True, "192.0.2.44/32"), (True, "203.0.113.66/32")]
        assert {b.cidr for b in g.blocks()} == {"203.0.113.66/32", "192.0.2.44/32"}
    finally:
        stop.set()
        worker.join(30)
    raw = net.alerts()
    alerts = [(a["detail-type"], a["detail"]["cidr"]) for a in raw]
    assert sorted(alerts) == [("Guard Block Added", "192.0.2.44/32"),
                              ("Guard Block Added", "203.0.113.66/32"),
                              ("Guard Block Refused", "198.51.100.7")]
    # The fabric's alert notifier (subscribed to the same topic) reads them too.
    read = security_alert({"Records": [{"Sns": {"Message": json.dumps(a)}} for a in raw]},
                          None)["alerts"]
    assert sorted((a["event"], a["resource"]) for a in read) == sorted(alerts)

    # After the TTL, the scheduled sweep (here its EventBridge form, a Scheduled Event sent to
    # the same Lambda handler) removes both blocks and exactly their entries.
    _wait(lambda: all(b.expired for b in g.blocks()), timeout=10)
    sweep = {"version": "0", "id": "s1", "source": "aws.events", "detail-type": "Scheduled Event",
             "account": "123456789012", "time": "2026-01-01T00:00:00Z", "region": net.cfg.region,
             "resources": [f"arn:aws:events:{net.cfg.region}:123456789012:rule/guard-sweep"],
             "detail": {}}
    ctx = new_context("guard", net.cfg.region, 60, net.aws, None)
    res = handle({"Records": [{"messageId": "m1", "body": json.dumps(sweep),
                               "attributes": {}}]}, ctx)
    assert res == {"batchItemFailures": []}
    assert g.blocks() == []
    assert [e for e in net.entries(net.shared_acl) if e["RuleAction"] == "deny"] == []
    assert net.addresses("CLOUDFRONT", 4) == [] and net.addresses("REGIONAL", 4) == []
    assert sorted(a["detail"]["cidr"] for a in net.alerts()
                  if a["detail-type"] == "Guard Block Removed") == [
        "192.0.2.44/32", "203.0.113.66/32"]


def _drained(net) -> bool:
    sqs = net.aws.client("sqs")
    url = sqs.get_queue_url(QueueName=f"guard-{net.t}")["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return attrs == {"ApproximateNumberOfMessages": "0",
                     "ApproximateNumberOfMessagesNotVisible": "0"}


def test_cloudtrail_change_from_outside_the_allowlist_blocks_the_caller(
        aws, tmp_path, monkeypatch) -> None:
    net = make_net(aws, tmp_path)
    monkeypatch.setenv("CLUSTERFLOW_GUARD_CONFIG", str(net.config_path))
    g = Guard(net.aws, net.cfg)
    g.init()
    rule = next(r for r in load_fabric().rules if r.name == "clusterflow-network-changes")
    assert TargetSpec(queue="guard-events") in rule.targets

    def change(source_ip: str, resource: str, **who: str) -> dict[str, Any]:
        event = copy.deepcopy(rule.examples.match[1])  # ReplaceNetworkAclEntry
        event["detail"].update(sourceIPAddress=source_ip, eventID=f"ct-{source_ip}",
                               requestParameters={"networkAclId": resource},
                               userIdentity={"arn": "arn:aws:iam::123456789012:user/mallory",
                                             **who})
        return event

    def run(event: dict[str, Any]) -> dict[str, Any]:
        ctx = new_context("guard", net.cfg.region, 60, net.aws, None)
        return handle({"Records": [{"messageId": "m", "body": json.dumps(event),
                                    "attributes": {}}]}, ctx)

    assert run(change("198.51.100.9", net.own_acl)) == {"batchItemFailures": []}  # admin net
    assert run(change("203.0.113.5", "acl-0notours000000000")) == {"batchItemFailures": []}
    assert run(change("ec2.amazonaws.com", net.own_acl)) == {"batchItemFailures": []}
    assert run(change("203.0.113.6", net.own_acl, invokedBy="cloudformation.amazonaws.com")
               ) == {"batchItemFailures": []}
    assert g.blocks() == []
    assert run(change("203.0.113.5", net.own_acl)) == {"batchItemFailures": []}
    [block] = g.blocks()
    assert block.cidr == "203.0.113.5/32"
    assert "ReplaceNetworkAclEntry" in block.reason and "mallory" in block.reason
    # Not an event the guard knows: a poison message, reported failed (-> the queue's DLQ).
    res = run({"source": "aws.s3", "detail-type": "Object Created", "detail": {}})
    assert res == {"batchItemFailures": [{"itemIdentifier": "m"}]}
    assert ADMIN not in {b.cidr for b in g.blocks()}
