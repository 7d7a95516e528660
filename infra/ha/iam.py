"""The HA roles' policies: JSON documents in ``infra/iam/``, rendered for one cluster.

The documents are the reviewable source of truth (tests lint them against AWS's own action,
resource and condition-key catalogue); code only fills in ``{{Placeholders}}``. The
double-brace form keeps them apart from IAM's own ``${aws:...}`` policy variables.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from infra.aws.clients import AwsTarget
from infra.ha.config import HaConfig

POLICY_DIR = Path(__file__).resolve().parent.parent / "iam"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# Which permission document each role carries.
HANDLER_POLICY = {"standby": "ha-standby-handler.json", "asg": "ha-asg-handler.json"}
INSTANCE_POLICY = "ha-head-instance.json"


class PolicyError(RuntimeError):
    """A policy document cannot be rendered; the message names the document and the gap."""


def policy_values(cfg: HaConfig, account: str, partition: str = "aws") -> dict[str, str]:
    return {"Partition": partition, "Region": cfg.region, "Account": account,
            "Cluster": cfg.cluster, "Prefix": cfg.prefix, "AsgName": cfg.asg_name,
            "AlarmName": cfg.alarm_name}


def render(name: str, values: dict[str, str]) -> dict[str, Any]:
    text = (POLICY_DIR / name).read_text()
    missing = sorted({m for m in PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise PolicyError(f"{name}: no value for {', '.join(missing)}")
    return json.loads(PLACEHOLDER.sub(lambda m: values[m.group(1)], text))


def account_id(target: AwsTarget) -> str:
    return target.client("sts").get_caller_identity()["Account"]


def _ensure_role(iam: Any, name: str, trust: dict[str, Any], description: str) -> str:
    try:
        return iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust),
                               Description=description)["Role"]["Arn"]
    except ClientError as e:
        if e.response["Error"]["Code"] != "EntityAlreadyExists":
            raise
        iam.update_assume_role_policy(RoleName=name, PolicyDocument=json.dumps(trust))
        return iam.get_role(RoleName=name)["Role"]["Arn"]


def ensure_roles(target: AwsTarget, cfg: HaConfig) -> dict[str, str]:
    """Create (or update) the handler role and the head's instance role + profile."""
    iam = target.client("iam")
    values = policy_values(cfg, account_id(target))
    handler_arn = _ensure_role(iam, cfg.handler_role, render("trust-lambda.json", values),
                               f"clusterflow {cfg.cluster}: head-node recovery handlers")
    iam.put_role_policy(RoleName=cfg.handler_role, PolicyName="ha-handler",
                        PolicyDocument=json.dumps(render(HANDLER_POLICY[cfg.design], values)))
    head_arn = _ensure_role(iam, cfg.instance_role, render("trust-ec2.json", values),
                            f"clusterflow {cfg.cluster}: head node")
    iam.put_role_policy(RoleName=cfg.instance_role, PolicyName="ha-head",
                        PolicyDocument=json.dumps(render(INSTANCE_POLICY, values)))
    try:
        profile = iam.create_instance_profile(InstanceProfileName=cfg.instance_role)
        profile_arn = profile["InstanceProfile"]["Arn"]
        iam.add_role_to_instance_profile(InstanceProfileName=cfg.instance_role,
                                         RoleName=cfg.instance_role)
    except ClientError as e:
        if e.response["Error"]["Code"] != "EntityAlreadyExists":
            raise
        profile_arn = iam.get_instance_profile(
            InstanceProfileName=cfg.instance_role)["InstanceProfile"]["Arn"]
    return {"handler_role_arn": handler_arn, "instance_role_arn": head_arn,
            "instance_profile_arn": profile_arn}
