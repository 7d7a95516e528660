"""``clusterflow run --dry-run``: every read-only check a run can make, and nothing else.

What it asks, in order, each reported ``ok``, ``failed`` (with AWS's own words) or
``unchecked`` (the endpoint lacks the API, or the principal may not ask):

1. who the credentials are (``sts:GetCallerIdentity``);
2. the plan (``flows.planning``): the estimate against ``budget``, and every resource's
   create/reuse/delete from the provisioning code's own describe calls;
3. the backend's account look-ups: ParallelCluster's config validated against the account
   (subnets, AZs, key pair, instance offerings) and then ``pcluster``'s own
   ``create_cluster(dryrun=True)``; the Batch environment's preflight (subnets, one AZ,
   security groups, key pair, instance offering);
4. IAM policy simulation of the calls the run makes (``iam:SimulatePrincipalPolicy`` for the
   caller), where the principal is allowed to simulate.

Nothing is created: these are describe, get, list, simulate and dry-run calls only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from flows.spec import PipelineSpec
    from infra.aws.clients import AwsTarget

# What provision, stage_in, publish and consume call (README "Running against your AWS account").
RUN_ACTIONS = [
    "s3:CreateBucket", "s3:PutObject", "s3:GetObject", "s3:ListBucket",
    "s3:PutBucketNotification", "s3:GetBucketNotification", "events:PutRule",
    "events:PutTargets", "sns:CreateTopic", "sns:SetTopicAttributes", "sns:Subscribe",
    "sns:ListSubscriptionsByTopic", "sqs:CreateQueue", "sqs:GetQueueUrl",
    "sqs:GetQueueAttributes", "sqs:SetQueueAttributes", "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
]
# What a parallelcluster run staged through FSx adds (flows.fsx_staging; the SSM calls of the
# visibility check are the backend's own).
FSX_ACTIONS = ["fsx:DescribeFileSystems", "fsx:CreateDataRepositoryTask",
               "fsx:DescribeDataRepositoryTasks"]


@dataclass
class Check:
    name: str
    result: str  # ok | failed | unchecked
    detail: str = ""


def _principal_arn(arn: str) -> str:
    """An assumed-role session ARN as the role ARN IAM simulates."""
    if ":assumed-role/" in arn:
        account = arn.split(":")[4]
        role = arn.split(":assumed-role/")[1].split("/")[0]
        return f"arn:aws:iam::{account}:role/{role}"
    return arn


def _aws_error(e: Exception) -> str:
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        return f"{err.get('Code')}: {err.get('Message')}"
    return f"{type(e).__name__}: {e}"


def _unsupported(e: Exception) -> bool:
    """The endpoint lacks the API, or the principal may not call it: unchecked, not failed."""
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation",
                        "NotImplemented", "InvalidAction") or status in (404, 500, 501)
    return isinstance(e, NotImplementedError)


def checks(spec: PipelineSpec, spec_path: Path, aws: AwsTarget) -> tuple[list[Check], dict]:
    from flows.planning.command import build

    out: list[Check] = []
    caller: dict[str, Any] = {}
    try:
        caller = aws.client("sts").get_caller_identity()
        out.append(Check("credentials", "ok", f"account {caller['Account']} as "
                                               f"{caller['Arn']}"))
    except (ClientError, BotoCoreError) as e:
        out.append(Check("credentials", "failed", _aws_error(e)))
    plan = build(spec, spec_path, None, offline=False, aws=aws)
    unchecked = [r for r in plan["resources"] if r["action"] == "unchecked"]
    out.append(Check("resources", "unchecked" if unchecked else "ok",
                     f"{len(plan['resources'])} resources, "
                     + ", ".join(f"{a} {sum(r['action'] == a for r in plan['resources'])}"
                                 for a in ("create", "reuse", "delete", "unchecked")
                                 if any(r["action"] == a for r in plan["resources"]))))
    if spec.parallelcluster is not None:
        out += _parallelcluster(spec, aws)
    if spec.batch is not None:
        out += _batch(spec, aws)
    if caller:
        out.append(_simulate(aws, _principal_arn(caller["Arn"]), run_actions(spec)))
    return out, plan


def _parallelcluster(spec: PipelineSpec, aws: AwsTarget) -> list[Check]:
    import dataclasses

    from infra.clusters.config_issues import ConfigInvalid
    from infra.clusters.parallelcluster import ParallelCluster
    from infra.clusters.parallelcluster_validate import config_region, load_cluster_config

    s = spec.parallelcluster
    region = config_region(load_cluster_config(s.config).raw, aws.region)
    target = dataclasses.replace(aws, region=region)
    try:
        config = load_cluster_config(s.config, aws=target)
    except ConfigInvalid as e:
        return [Check("parallelcluster account look-ups", "failed",
                      "; ".join(str(i) for i in e.issues))]
    except Exception as e:  # noqa: BLE001 - any look-up failure is the check's result
        return [Check("parallelcluster account look-ups", "unchecked", _aws_error(e))]
    out = [Check("parallelcluster account look-ups", "ok",
                 f"{s.config} against {region}")]
    try:
        ParallelCluster(s.cluster_name, target)._call(
            "create_cluster", "dry run", cluster_configuration=config.raw, dryrun=True)
        out.append(Check("pcluster create-cluster --dryrun", "ok"))
    except Exception as e:  # noqa: BLE001 - pcluster.lib raises its own types
        text = str(e)
        ok = "dryrun" in text.lower() and "success" in text.lower()
        out.append(Check("pcluster create-cluster --dryrun", "ok" if ok else "failed", text))
    return out


def _batch(spec: PipelineSpec, aws: AwsTarget) -> list[Check]:
    import dataclasses

    from infra.clusters.batch.provision import preflight
    from infra.clusters.batch_config import load_batch_config
    from infra.clusters.config_issues import ConfigInvalid

    cfg = load_batch_config(spec.batch.config)
    try:
        preflight(dataclasses.replace(aws, region=cfg.region), cfg, str(spec.batch.config))
    except ConfigInvalid as e:
        return [Check("batch account look-ups", "failed",
                      "; ".join(str(i) for i in e.issues))]
    except (ClientError, BotoCoreError) as e:
        return [Check("batch account look-ups", "unchecked", _aws_error(e))]
    return [Check("batch account look-ups", "ok", f"{spec.batch.config} against {cfg.region}")]


def run_actions(spec: PipelineSpec) -> list[str]:
    """The IAM actions the run will call from where clusterflow runs."""
    from flows.fsx_checks import uses_fsx

    return RUN_ACTIONS + (FSX_ACTIONS if uses_fsx(spec) else [])


def _simulate(aws: AwsTarget, principal: str, actions: list[str]) -> Check:
    try:
        got = aws.client("iam").simulate_principal_policy(PolicySourceArn=principal,
                                                          ActionNames=actions)
    except (ClientError, BotoCoreError) as e:
        return Check("iam policy simulation", "unchecked", _aws_error(e))
    except Exception as e:  # noqa: BLE001 - an endpoint without the API answers a 500 page
        return Check("iam policy simulation", "unchecked",
                     f"the endpoint cannot simulate policies ({type(e).__name__})")
    denied = [r["EvalActionName"] for r in got.get("EvaluationResults", [])
              if r.get("EvalDecision") != "allowed"]
    if denied:
        return Check("iam policy simulation", "failed", "denied: " + ", ".join(denied))
    return Check("iam policy simulation", "ok", f"{len(actions)} actions allowed")


def dry_run(spec: PipelineSpec, spec_path: Path, as_json: bool) -> int:
    """Print the checks; 0 when none failed, 1 otherwise. Creates nothing."""
    from rich.console import Console
    from rich.markup import escape

    from flows.planning.command import render
    from infra.aws.clients import AwsConfigError, AwsTarget, real_target

    try:
        import os

        if spec.aws == "real":
            aws = real_target(spec.region)
        else:
            endpoint = os.environ.get("AWS_ENDPOINT_URL")
            if not endpoint:
                Console(stderr=True).print("error: --dry-run checks an account: use --aws real "
                                           "(or set AWS_ENDPOINT_URL)", markup=False)
                return 2
            aws = AwsTarget(region=spec.region, endpoint_url=endpoint)
    except AwsConfigError as e:
        Console(stderr=True).print(f"error: {e}", markup=False)
        return 2
    found, plan = checks(spec, spec_path, aws)
    failed = any(c.result == "failed" for c in found)
    if as_json:
        sys.stdout.write(json.dumps({"dry_run": True, "checks": [asdict(c) for c in found],
                                     "plan": plan, "ok": not failed}) + "\n")
    else:
        render(plan)
        out = Console(soft_wrap=True, highlight=False)
        out.print("[bold]dry run[/] (nothing was created)")
        for c in found:
            colour = {"ok": "green", "failed": "red"}.get(c.result, "yellow")
            out.print(f"  [{colour}]{c.result:<9}[/] {escape(c.name)}"
                      + (f": {escape(c.detail)}" if c.detail else ""))
    return 1 if failed else 0
