"""The guard-sweep deployment's flow: expired blocks go, live ones stay, no config = no-op."""

from __future__ import annotations

import time

from infra.guard.service import Guard
from tests.infra.guard.support import make_net


def test_guard_sweep_flow_removes_only_expired_blocks(aws, prefect_api, tmp_path,
                                                      monkeypatch) -> None:
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    from flows.guard_sweep import guard_sweep

    net = make_net(aws, tmp_path)
    g = Guard(net.aws, net.cfg)
    g.init()
    g.block("203.0.113.10", 1, "short")
    g.block("203.0.113.11", 3600, "long")
    time.sleep(1.2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", net.aws.endpoint_url)
    monkeypatch.delenv("CLUSTERFLOW_GUARD_CONFIG", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: prefect_api,
                                     PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                     PREFECT_LOGGING_TO_API_ENABLED: False}):
        assert guard_sweep() == {"skipped": "no guard config", "unblocked": []}
        monkeypatch.setenv("CLUSTERFLOW_GUARD_CONFIG", str(net.config_path))
        assert guard_sweep() == {"unblocked": ["203.0.113.10/32"]}
    assert [b.cidr for b in g.blocks()] == ["203.0.113.11/32"]
    assert [e.get("CidrBlock") for e in net.entries(net.own_acl)
            if e["RuleAction"] == "deny"] == ["203.0.113.11/32", "203.0.113.11/32"]
