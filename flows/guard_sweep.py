"""The scheduled sweep of expired guard blocks, as a Prefect flow (``guard-sweep/every-5-min``).

Why a Prefect deployment rather than an EventBridge schedule: the embedded endpoint never fires
EventBridge schedules, while the cluster already runs a Prefect worker that executes cron
deployments here and on AWS alike. On AWS an EventBridge Scheduler rule that sends a
``Scheduled Event`` to the guard Lambda does the same (``event_bridge.guard_handler``).

Without a guard config (``$CLUSTERFLOW_GUARD_CONFIG`` or ``config``) the guard is off and the
flow does nothing.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger

from infra.aws.embedded import aws_target
from infra.guard.config import DEFAULT_CONFIG_ENV, load_guard_config
from infra.guard.registry import RegistryMissing
from infra.guard.service import Guard


@flow(name="guard-sweep", log_prints=False)
def guard_sweep(config: str | None = None, aws: str = "embedded") -> dict[str, Any]:
    """Unblock every guard block whose TTL has run out; publish each unblock."""
    log = get_run_logger()
    path = config or os.environ.get(DEFAULT_CONFIG_ENV)
    if not path:
        log.info("guard not configured (%s unset): nothing to sweep", DEFAULT_CONFIG_ENV)
        return {"skipped": "no guard config", "unblocked": []}
    cfg = load_guard_config(path)
    with aws_target(aws, cfg.region) as target:  # type: ignore[arg-type]
        try:
            done = Guard(target, cfg).sweep()
        except RegistryMissing as e:
            log.info("%s", e)
            return {"skipped": str(e), "unblocked": []}
    for r in done:
        log.info("unblocked %s (expired %s)", r.record.cidr, r.record.as_dict()["expires"])
    return {"unblocked": [r.record.cidr for r in done]}
