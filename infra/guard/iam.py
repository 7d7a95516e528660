"""The guard handler's IAM policy: ``infra/iam/guard-handler.json``, rendered for one config.

The handler only updates what ``clusterflow guard init`` created: deny entries on NACLs
tagged ``clusterflow:cluster=<cluster>``, the guard's own two IP sets per scope (CLOUDFRONT
ones live in us-east-1), its registry table, the alerts topic and its queue. It creates
nothing, so it needs no Create*/Put*Policy and no wildcard action.
"""

from __future__ import annotations

from typing import Any

from infra.guard.config import GuardConfig
from infra.ha.iam import render

HANDLER_POLICY = "guard-handler.json"


def policy_values(cfg: GuardConfig, account: str, cluster: str, queue: str = "guard-events",
                  partition: str = "aws") -> dict[str, str]:
    return {"Partition": partition, "Region": cfg.region, "Account": account,
            "Cluster": cluster, "GuardPrefix": cfg.name_prefix,
            "GuardTable": cfg.registry_table, "AlertsTopic": cfg.alerts_topic,
            "GuardQueue": queue}


def handler_policy(cfg: GuardConfig, account: str, cluster: str) -> dict[str, Any]:
    return render(HANDLER_POLICY, policy_values(cfg, account, cluster))
