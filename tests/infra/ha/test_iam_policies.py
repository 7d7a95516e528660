"""The HA roles' and the guard handler's IAM documents: valid, least privilege, scoped.

Checked against AWS's own catalogue of actions, resource types and condition keys (the one
parliament ships), so "EC2 allows no resource-level permission for this action" is looked up,
not assumed.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import parliament
import pytest
from parliament import analyze_policy_string

from infra.aws.clients import AwsTarget
from infra.guard.config import GuardConfig
from infra.guard.iam import HANDLER_POLICY as GUARD_POLICY
from infra.guard.iam import handler_policy, policy_values
from infra.ha.config import HaConfig
from infra.ha.iam import (
    HANDLER_POLICY,
    INSTANCE_POLICY,
    PLACEHOLDER,
    POLICY_DIR,
    PolicyError,
    ensure_roles,
    render,
)

CFG = HaConfig(cluster="demo", design="asg")
VALUES = {"Partition": "aws", "Region": "us-east-1", "Account": "123456789012",
          "Cluster": "demo", "Prefix": "clusterflow-demo", "AsgName": "clusterflow-demo-head",
          "AlarmName": "clusterflow-demo-head-status",
          # the guard handler's (infra.guard.iam.policy_values, the config's defaults)
          "GuardPrefix": "clusterflow-guard", "GuardTable": "clusterflow-guard",
          "AlertsTopic": "clusterflow-security-alerts", "GuardQueue": "guard-events"}
PERMISSION_DOCS = sorted({INSTANCE_POLICY, *HANDLER_POLICY.values(), GUARD_POLICY})
# The names a document's non-EC2 grants must stay within (its own resources).
OWN_NAMES = {GUARD_POLICY: ("clusterflow-guard", "clusterflow-security-alerts",
                            "guard-events")}
CATALOGUE = json.loads((Path(parliament.__file__).parent / "iam_definition.json").read_text())


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def _resource_types(action: str) -> list[str]:
    """The ARN resource types AWS lets a policy name for ``action`` ([] = only "*")."""
    prefix, name = action.split(":")
    service = next(s for s in CATALOGUE if s["prefix"] == prefix)
    priv = next(p for p in service["privileges"] if p["privilege"] == name)
    return [r["resource_type"].rstrip("*") for r in priv["resource_types"] if r["resource_type"]]


def _statements(doc: str) -> list[dict[str, Any]]:
    return render(doc, VALUES)["Statement"]


def test_every_document_renders_completely() -> None:
    docs = sorted(p.name for p in POLICY_DIR.glob("*.json"))
    assert set(PERMISSION_DOCS) | {"trust-ec2.json", "trust-lambda.json"} == set(docs)
    for doc in docs:
        assert PLACEHOLDER.findall((POLICY_DIR / doc).read_text()) or doc.startswith("trust")
        assert not PLACEHOLDER.search(json.dumps(render(doc, VALUES))), doc
    with pytest.raises(PolicyError, match="no value for Cluster"):
        render(INSTANCE_POLICY, {k: v for k, v in VALUES.items() if k != "Cluster"})


def _granted(statements: list[dict[str, Any]], action: str, arn_format: str) -> bool:
    """Some statement grants ``action`` on a resource of the type ``arn_format`` names."""
    kind = arn_format.rsplit(":", 1)[-1].split("/")[0]
    return any(action in _as_list(st["Action"])
               and any(r.rsplit(":", 1)[-1].split("/")[0] == kind
                       for r in _as_list(st["Resource"])) for st in statements)


@pytest.mark.parametrize("doc", PERMISSION_DOCS)
def test_parliament_finds_nothing(doc: str) -> None:
    statements = _statements(doc)
    policy = analyze_policy_string(json.dumps(render(doc, VALUES)),
                                   include_community_auditors=True)
    findings = []
    for f in policy.findings:
        # parliament checks each statement alone; AWS authorizes each resource of a call on
        # its own, so CreateVolume may take the volume from one statement (RequestTag) and
        # the snapshot from another (ResourceTag). Only a type no statement grants is a gap.
        if f.issue == "RESOURCE_MISMATCH" and all(
                _granted(statements, d["action"], d["required_format"]) for d in f.detail):
            continue
        findings.append((f.issue, f.detail))
    assert findings == []


@pytest.mark.parametrize("doc", PERMISSION_DOCS)
def test_least_privilege(doc: str) -> None:
    for st in _statements(doc):
        assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st
        actions = _as_list(st["Action"])
        assert all("*" not in a for a in actions), f"{doc} {st['Sid']}: wildcard action"
        resources = _as_list(st["Resource"])
        if resources == ["*"]:
            # Only where AWS offers nothing narrower (the Describe calls).
            for a in actions:
                assert _resource_types(a) == [], f"{doc} {st['Sid']}: {a} can be scoped"
            continue
        for a in actions:
            assert _resource_types(a), f"{doc}: {a} takes no resource ARN"
        # EC2 resources are named by wildcard ids: each such grant must be narrowed by tag
        # (or allowed only while the resource is being created and tagged).
        if any(":ec2:" in r for r in resources):
            keys = {k for cond in st["Condition"].values() for k in cond}
            assert keys & {"aws:ResourceTag/clusterflow:cluster",
                           "aws:RequestTag/clusterflow:cluster", "ec2:CreateAction"}, (
                f"{doc} {st['Sid']}: not scoped by the cluster tag")
        else:  # other services: the exact ARN of this cluster's resource
            own = OWN_NAMES.get(doc, ("clusterflow-demo",))
            assert all(any(n in r for n in own) for r in resources), f"{doc} {st['Sid']}"


def test_instance_role_may_associate_only_the_tagged_eip() -> None:
    grants = [st for st in _statements(INSTANCE_POLICY)
              if "ec2:AssociateAddress" in _as_list(st["Action"])]
    eip = [st for st in grants if any("elastic-ip/" in r for r in _as_list(st["Resource"]))]
    assert len(eip) == 1
    assert eip[0]["Condition"] == {"StringEquals": {
        "aws:ResourceTag/clusterflow:cluster": "demo",
        "aws:ResourceTag/clusterflow:role": "head-eip"}}
    # ... and only with this cluster's instances; nothing else may touch addresses.
    others = [st for st in grants if st is not eip[0]]
    assert [r for st in others for r in _as_list(st["Resource"])] == [
        "arn:aws:ec2:us-east-1:123456789012:instance/*"]
    assert all(st["Condition"]["StringEquals"] == {"aws:ResourceTag/clusterflow:cluster": "demo"}
               for st in others)
    actions = {a for st in _statements(INSTANCE_POLICY) for a in _as_list(st["Action"])}
    assert not actions & {"ec2:DisassociateAddress", "ec2:ReleaseAddress",
                          "ec2:AllocateAddress", "ec2:DeleteVolume", "ec2:DeleteSnapshot"}


def test_handlers_get_only_what_their_design_calls() -> None:
    def actions(doc: str) -> set[str]:
        return {a for st in _statements(doc) for a in _as_list(st["Action"])}

    asg, standby = actions(HANDLER_POLICY["asg"]), actions(HANDLER_POLICY["standby"])
    assert "autoscaling:CompleteLifecycleAction" in asg - standby
    assert {"ec2:StartInstances", "ec2:StopInstances", "ec2:AssociateAddress",
            "cloudwatch:PutMetricAlarm"} <= standby - asg
    # The lifecycle completion names this cluster's group only.
    [st] = [s for s in _statements(HANDLER_POLICY["asg"])
            if "autoscaling:CompleteLifecycleAction" in _as_list(s["Action"])]
    assert st["Resource"].endswith(":autoScalingGroupName/clusterflow-demo-head")


def test_trust_policies_name_one_service_each() -> None:
    for doc, service in (("trust-ec2.json", "ec2.amazonaws.com"),
                         ("trust-lambda.json", "lambda.amazonaws.com")):
        [st] = render(doc, VALUES)["Statement"]
        assert st["Principal"] == {"Service": service} and st["Action"] == "sts:AssumeRole"


def test_roles_carry_the_rendered_documents(aws: AwsTarget) -> None:
    cfg = HaConfig(cluster=f"iam-{uuid.uuid4().hex[:8]}", design="standby")
    arns = ensure_roles(aws, cfg)
    assert arns == ensure_roles(aws, cfg)  # idempotent
    iam = aws.client("iam")
    doc = iam.get_role_policy(RoleName=cfg.handler_role, PolicyName="ha-handler")
    body = doc["PolicyDocument"]
    body = json.loads(body) if isinstance(body, str) else body
    assert json.dumps(body).count(f'"{cfg.cluster}"') >= 5
    profile = iam.get_instance_profile(InstanceProfileName=cfg.instance_role)
    assert [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]] == [cfg.instance_role]


def test_guard_handler_may_only_edit_what_guard_init_created() -> None:
    statements = _statements(GUARD_POLICY)
    actions = {a for st in statements for a in _as_list(st["Action"])}
    # Exactly what event_bridge.guard_handler calls (plus Lambda's queue and log calls): it
    # adds and removes entries and addresses, never creates or deletes a resource.
    assert actions == {
        "ec2:DescribeNetworkAcls", "ec2:DescribeSubnets", "ec2:DescribeVpcs",
        "ec2:CreateNetworkAclEntry", "ec2:DeleteNetworkAclEntry",
        "wafv2:ListIPSets", "wafv2:GetIPSet", "wafv2:UpdateIPSet",
        "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:DeleteItem", "dynamodb:Scan",
        "sns:Publish", "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes", "logs:CreateLogGroup", "logs:CreateLogStream",
        "logs:PutLogEvents"}
    assert not actions & {"wafv2:UpdateWebACL", "wafv2:CreateIPSet", "wafv2:DeleteIPSet",
                          "ec2:CreateNetworkAcl", "ec2:DeleteNetworkAcl",
                          "ec2:RevokeSecurityGroupIngress", "dynamodb:CreateTable"}
    [waf] = [st for st in statements if "wafv2:UpdateIPSet" in _as_list(st["Action"])]
    assert sorted(r.split(":")[3] for r in waf["Resource"]) == [
        "us-east-1", "us-east-1", "us-east-1", "us-east-1"]  # VALUES' region is us-east-1 too
    assert all("/ipset/clusterflow-guard-v" in r for r in waf["Resource"])
    # Rendered from a config: its own names, CLOUDFRONT sets always in us-east-1.
    cfg = GuardConfig(region="eu-west-1", name_prefix="hpc-guard", registry_table="hpc-blocks",
                      alerts_topic="hpc-alerts")
    doc = handler_policy(cfg, "123456789012", "demo")
    [waf] = [st for st in doc["Statement"] if "wafv2:UpdateIPSet" in _as_list(st["Action"])]
    assert sorted({(r.split(":")[3], r.split(":")[5].split("/")[0]) for r in waf["Resource"]}
                  ) == [("eu-west-1", "regional"), ("us-east-1", "global")]
    text = json.dumps(doc)
    assert "table/hpc-blocks" in text and "sns:eu-west-1:123456789012:hpc-alerts" in text
    assert policy_values(cfg, "1", "c")["Cluster"] == "c"
