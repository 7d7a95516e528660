"""Create (or bring up to date) one cluster's head-node HA resources, for either design.

Everything is found again by name or by the ``clusterflow:cluster`` tag, so deploying twice
changes nothing. What each design creates:

- both: network (embedded endpoint only, when no subnets are given), a security group, the
  cluster's tagged Elastic IP, the handler and instance roles (policies from ``infra/iam``),
  and the handler Lambda functions (this package zipped);
- standby: a primary (first AZ) and a stopped standby (second AZ) from the same user data,
  the ``StatusCheckFailed`` alarm whose action invokes the recovery function;
- asg: a launch template, a group of exactly one instance across every AZ with a launch and
  a terminate lifecycle hook, and EventBridge rules that deliver the hooks to their functions.

The shared volume itself is not created here: the first head's boot makes it (blank), and
every later head restores it from the newest snapshot in its own AZ.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from pydantic import BaseModel

from infra.aws.clients import AwsTarget
from infra.ha import head_boot as hb
from infra.ha.config import HaConfig
from infra.ha.handlers import SETTINGS_ENV
from infra.ha.iam import account_id, ensure_roles
from infra.ha.user_data import render_user_data, user_data_b64

REPO = Path(__file__).resolve().parent.parent.parent
LAMBDA_FILES = ("infra/__init__.py", "infra/aws/__init__.py", "infra/aws/clients.py",
                "infra/ha/__init__.py", "infra/ha/handlers.py", "infra/ha/head_boot.py")
LAMBDA_RUNTIME = "python3.12"
HANDLERS = {"recovery": "infra.ha.handlers.recovery_handler",
            "terminate": "infra.ha.handlers.terminate_hook_handler",
            "launch": "infra.ha.handlers.launch_hook_handler"}
HOOK_DETAIL_TYPES = {"launch": "EC2 Instance-launch Lifecycle Action",
                     "terminate": "EC2 Instance-terminate Lifecycle Action"}
SLURM_PORTS = (6817, 6819)  # slurmctld, slurmd, slurmdbd: reachable from inside the VPC only


class DeployError(RuntimeError):
    """The HA resources cannot be created as configured; the message says what to change."""


class Deployment(BaseModel):
    """What was deployed, by id: the drill and the operator's runbook start from this."""

    cluster: str
    design: str
    region: str
    account: str
    subnets: dict[str, str]  # AZ -> subnet id, in config order
    security_group_id: str
    eip_allocation_id: str
    public_ip: str
    roles: dict[str, str]
    functions: dict[str, str]  # recovery|terminate|launch -> function ARN
    primary_id: str | None = None
    standby_id: str | None = None
    alarm_name: str | None = None
    launch_template_id: str | None = None
    asg_name: str | None = None


def handler_settings(cfg: HaConfig, wait_delay: int = 5) -> dict[str, Any]:
    v = cfg.shared_volume
    return {"cluster": cfg.cluster, "device": v.device, "size_gib": v.size_gib,
            "volume_type": v.volume_type, "keep_snapshots": cfg.keep_snapshots,
            "alarm_name": cfg.alarm_name, "wait_delay": wait_delay}


def _tags(cfg: HaConfig, role: str | None = None, **more: str) -> dict[str, str]:
    tags = {hb.TAG_CLUSTER: cfg.cluster, **more}
    if role:
        tags[hb.TAG_ROLE] = role
    return tags


def _code(e: ClientError) -> str:
    return e.response["Error"]["Code"]


# --------------------------------------------------------------------------- shared parts


def ensure_network(target: AwsTarget, cfg: HaConfig) -> tuple[dict[str, str], str]:
    """Subnets by AZ (config order) and the VPC id."""
    ec2 = target.client("ec2")
    if cfg.subnet_ids:
        subnets = ec2.describe_subnets(SubnetIds=cfg.subnet_ids)["Subnets"]
        by_id = {s["SubnetId"]: s for s in subnets}
        for sid, az in zip(cfg.subnet_ids, cfg.availability_zones, strict=True):
            if by_id[sid]["AvailabilityZone"] != az:
                raise DeployError(f"subnet {sid} is in {by_id[sid]['AvailabilityZone']}, "
                                  f"not {az}: list subnet_ids in availability_zones order")
        vpcs = {s["VpcId"] for s in subnets}
        if len(vpcs) != 1:
            raise DeployError(f"subnet_ids span several VPCs ({', '.join(sorted(vpcs))})")
        return dict(zip(cfg.availability_zones, cfg.subnet_ids, strict=True)), vpcs.pop()
    if not target.embedded:
        raise DeployError("set subnet_ids (one subnet per availability zone) in the HA config: "
                          "clusterflow creates a network only on the embedded endpoint")
    tag_filter = [{"Name": f"tag:{hb.TAG_CLUSTER}", "Values": [cfg.cluster]}]
    vpcs = ec2.describe_vpcs(Filters=tag_filter)["Vpcs"]
    vpc_id = vpcs[0]["VpcId"] if vpcs else ec2.create_vpc(
        CidrBlock="10.77.0.0/16",
        TagSpecifications=hb.tag_spec("vpc", _tags(cfg)))["Vpc"]["VpcId"]
    existing = {s["AvailabilityZone"]: s["SubnetId"] for s in ec2.describe_subnets(
        Filters=[*tag_filter, {"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]}
    out = {}
    for i, az in enumerate(cfg.availability_zones):
        out[az] = existing.get(az) or ec2.create_subnet(
            VpcId=vpc_id, CidrBlock=f"10.77.{i}.0/24", AvailabilityZone=az,
            TagSpecifications=hb.tag_spec("subnet", _tags(cfg)))["Subnet"]["SubnetId"]
    return out, vpc_id


def ensure_security_group(target: AwsTarget, cfg: HaConfig, vpc_id: str) -> str:
    ec2 = target.client("ec2")
    name = f"{cfg.prefix}-head"
    found = ec2.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}])
    if found["SecurityGroups"]:
        return found["SecurityGroups"][0]["GroupId"]
    cidr = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]["CidrBlock"]
    sg = ec2.create_security_group(
        GroupName=name, VpcId=vpc_id, Description=f"clusterflow {cfg.cluster} head node",
        TagSpecifications=hb.tag_spec("security-group", _tags(cfg)))["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": SLURM_PORTS[0], "ToPort": SLURM_PORTS[1],
        "IpRanges": [{"CidrIp": cidr, "Description": "Slurm inside the VPC"}]}])
    return sg


def ensure_eip(target: AwsTarget, cfg: HaConfig) -> dict[str, str]:
    ec2 = target.client("ec2")
    found = ec2.describe_addresses(Filters=[
        {"Name": f"tag:{hb.TAG_CLUSTER}", "Values": [cfg.cluster]},
        {"Name": f"tag:{hb.TAG_ROLE}", "Values": [hb.ROLE_EIP]}])["Addresses"]
    if found:
        return {"allocation_id": found[0]["AllocationId"], "public_ip": found[0]["PublicIp"]}
    a = ec2.allocate_address(Domain="vpc", TagSpecifications=hb.tag_spec(
        "elastic-ip", _tags(cfg, hb.ROLE_EIP, Name=f"{cfg.prefix}-head")))
    return {"allocation_id": a["AllocationId"], "public_ip": a["PublicIp"]}


def image_id(target: AwsTarget, cfg: HaConfig) -> str:
    if cfg.image_id:
        return cfg.image_id
    try:
        return target.client("ssm").get_parameter(Name=cfg.image_parameter)["Parameter"]["Value"]
    except ClientError as e:
        raise DeployError(f"cannot resolve the AMI from SSM parameter {cfg.image_parameter} "
                          f"({_code(e)}); set image_id in the HA config") from None


def lambda_zip() -> bytes:
    """The handler package: the handlers, the boot logic they share, and ``infra.aws.clients``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for rel in LAMBDA_FILES:
            info = zipfile.ZipInfo(rel, date_time=(2020, 1, 1, 0, 0, 0))  # reproducible
            info.external_attr = 0o644 << 16
            z.writestr(info, (REPO / rel).read_bytes(), zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _retry_iam_propagation(call: Any, what: str, timeout: float) -> Any:
    """A new role takes seconds to be usable by Lambda/EC2 on AWS; retry only that error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except ClientError as e:
            msg = str(e)
            propagating = _code(e) in ("InvalidParameterValueException",
                                       "InvalidParameterValue") and (
                "assume" in msg or "instance profile" in msg.lower())
            if not propagating or time.monotonic() > deadline:
                raise
            time.sleep(3)
    raise DeployError(f"{what} did not succeed")  # pragma: no cover


def ensure_function(target: AwsTarget, cfg: HaConfig, kind: str, role_arn: str,
                    settings: dict[str, Any]) -> str:
    lam = target.client("lambda")
    name = f"{cfg.prefix}-ha-{kind}"
    env = {"Variables": {SETTINGS_ENV: json.dumps(settings)}}
    code = lambda_zip()
    try:
        fn = _retry_iam_propagation(lambda: lam.create_function(
            FunctionName=name, Runtime=LAMBDA_RUNTIME, Role=role_arn, Handler=HANDLERS[kind],
            Code={"ZipFile": code}, Timeout=900, MemorySize=256, Environment=env,
            Description=f"clusterflow {cfg.cluster}: head-node {kind} handler",
            Tags=_tags(cfg)), f"creating function {name}", timeout=90)
        return fn["FunctionArn"]
    except ClientError as e:
        if _code(e) != "ResourceConflictException":
            raise
    lam.update_function_code(FunctionName=name, ZipFile=code)
    lam.get_waiter("function_updated").wait(FunctionName=name,
                                            WaiterConfig={"Delay": 2, "MaxAttempts": 60})
    return lam.update_function_configuration(
        FunctionName=name, Role=role_arn, Handler=HANDLERS[kind], Timeout=900,
        Environment=env)["FunctionArn"]


def _allow_invoke(target: AwsTarget, function_arn: str, principal: str, source_arn: str,
                  sid: str) -> None:
    try:
        target.client("lambda").add_permission(
            FunctionName=function_arn, StatementId=sid, Action="lambda:InvokeFunction",
            Principal=principal, SourceArn=source_arn)
    except ClientError as e:
        if _code(e) != "ResourceConflictException":
            raise


def _common(target: AwsTarget, cfg: HaConfig) -> dict[str, Any]:
    subnets, vpc_id = ensure_network(target, cfg)
    return {"subnets": subnets, "vpc_id": vpc_id,
            "sg": ensure_security_group(target, cfg, vpc_id), "eip": ensure_eip(target, cfg),
            "roles": ensure_roles(target, cfg), "image": image_id(target, cfg),
            "account": account_id(target)}


# --------------------------------------------------------------------------- standby


def _live_instances(ec2: Any, cfg: HaConfig, role: str) -> list[dict[str, Any]]:
    res = ec2.describe_instances(Filters=[
        {"Name": f"tag:{hb.TAG_CLUSTER}", "Values": [cfg.cluster]},
        {"Name": f"tag:{hb.TAG_ROLE}", "Values": [role]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
    return [i for r in res["Reservations"] for i in r["Instances"]]


def _run_head(target: AwsTarget, cfg: HaConfig, c: dict[str, Any], role: str, az: str) -> str:
    ec2 = target.client("ec2")
    kwargs = dict(
        ImageId=c["image"], InstanceType=cfg.instance_type, MinCount=1, MaxCount=1,
        SubnetId=c["subnets"][az], SecurityGroupIds=[c["sg"]],
        IamInstanceProfile={"Arn": c["roles"]["instance_profile_arn"]},
        UserData=render_user_data(cfg),
        MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
        TagSpecifications=hb.tag_spec("instance", _tags(cfg, role, Name=f"{cfg.prefix}-{role}")))
    inst = _retry_iam_propagation(lambda: ec2.run_instances(**kwargs)["Instances"][0],
                                  f"launching the {role}", timeout=60)
    return inst["InstanceId"]


def deploy_standby(target: AwsTarget, cfg: HaConfig, wait_delay: int = 5) -> Deployment:
    ec2, cw = target.client("ec2"), target.client("cloudwatch")
    c = _common(target, cfg)
    # After a failover the roles have swapped (and a terminated primary left no standby):
    # keep what runs, and put a missing standby in an AZ other than the primary's.
    found = {role: _live_instances(ec2, cfg, role) for role in (hb.ROLE_PRIMARY, hb.ROLE_STANDBY)}
    if found[hb.ROLE_PRIMARY]:
        primary = found[hb.ROLE_PRIMARY][0]["InstanceId"]
        primary_az = found[hb.ROLE_PRIMARY][0]["Placement"]["AvailabilityZone"]
    else:
        primary_az = cfg.availability_zones[0]
        primary = _run_head(target, cfg, c, hb.ROLE_PRIMARY, primary_az)
    if found[hb.ROLE_STANDBY]:
        standby = found[hb.ROLE_STANDBY][0]["InstanceId"]
    else:
        standby_az = next(az for az in cfg.availability_zones if az != primary_az)
        standby = _run_head(target, cfg, c, hb.ROLE_STANDBY, standby_az)
        # It boots once (its boot script sees the standby role and claims nothing), then
        # waits stopped: paid for as a volume, not as an instance.
        ec2.get_waiter("instance_running").wait(InstanceIds=[standby],
                                                WaiterConfig={"Delay": wait_delay})
        ec2.stop_instances(InstanceIds=[standby])
    fn = ensure_function(target, cfg, "recovery", c["roles"]["handler_role_arn"],
                         handler_settings(cfg, wait_delay))
    alarm_arn = f"arn:aws:cloudwatch:{cfg.region}:{c['account']}:alarm:{cfg.alarm_name}"
    _allow_invoke(target, fn, "lambda.alarms.cloudwatch.amazonaws.com", alarm_arn, "head-alarm")
    cw.put_metric_alarm(
        AlarmName=cfg.alarm_name, Namespace="AWS/EC2", MetricName="StatusCheckFailed",
        AlarmDescription=f"clusterflow {cfg.cluster}: head node failed its status checks; "
                         f"invokes {fn.rsplit(':', 1)[-1]} to fail over to the standby",
        Dimensions=[{"Name": "InstanceId", "Value": primary}], Statistic="Maximum",
        Period=cfg.standby.alarm_period_s, EvaluationPeriods=cfg.standby.alarm_evaluation_periods,
        Threshold=1, ComparisonOperator="GreaterThanOrEqualToThreshold",
        # A head that vanished (terminated, host lost) reports nothing: that is a failure too.
        TreatMissingData="breaching", AlarmActions=[fn])
    return Deployment(
        cluster=cfg.cluster, design="standby", region=cfg.region, account=c["account"],
        subnets=c["subnets"], security_group_id=c["sg"],
        eip_allocation_id=c["eip"]["allocation_id"], public_ip=c["eip"]["public_ip"],
        roles=c["roles"], functions={"recovery": fn}, primary_id=primary, standby_id=standby,
        alarm_name=cfg.alarm_name)


# --------------------------------------------------------------------------- asg


def _ensure_launch_template(target: AwsTarget, cfg: HaConfig, c: dict[str, Any]) -> str:
    ec2 = target.client("ec2")
    name = f"{cfg.prefix}-head"
    data = {
        "ImageId": c["image"], "InstanceType": cfg.instance_type,
        "IamInstanceProfile": {"Arn": c["roles"]["instance_profile_arn"]},
        "SecurityGroupIds": [c["sg"]],
        "UserData": user_data_b64(cfg),
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "TagSpecifications": hb.tag_spec("instance", _tags(cfg, hb.ROLE_HEAD,
                                                           Name=f"{cfg.prefix}-head")),
    }
    try:
        lt = ec2.create_launch_template(
            LaunchTemplateName=name, LaunchTemplateData=data,
            TagSpecifications=hb.tag_spec("launch-template", _tags(cfg)))["LaunchTemplate"]
        return lt["LaunchTemplateId"]
    except ClientError as e:
        if "AlreadyExists" not in _code(e):
            raise
    ver = ec2.create_launch_template_version(LaunchTemplateName=name, LaunchTemplateData=data)
    ec2.modify_launch_template(LaunchTemplateName=name, DefaultVersion=str(
        ver["LaunchTemplateVersion"]["VersionNumber"]))
    return ver["LaunchTemplateVersion"]["LaunchTemplateId"]


def _hooks(cfg: HaConfig) -> list[dict[str, Any]]:
    beat = cfg.asg.lifecycle_heartbeat_s
    return [
        # No restored state, no head: a launch whose restore failed is abandoned and replaced.
        {"LifecycleHookName": "restore-shared-volume", "DefaultResult": "ABANDON",
         "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING", "HeartbeatTimeout": beat},
        {"LifecycleHookName": "snapshot-shared-volume", "DefaultResult": "CONTINUE",
         "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING", "HeartbeatTimeout": beat},
    ]


def deploy_asg(target: AwsTarget, cfg: HaConfig, wait_delay: int = 5) -> Deployment:
    asg, events = target.client("autoscaling"), target.client("events")
    c = _common(target, cfg)
    lt_id = _ensure_launch_template(target, cfg, c)
    settings = handler_settings(cfg, wait_delay)
    functions = {}
    for kind in ("terminate", "launch"):
        fn = ensure_function(target, cfg, kind, c["roles"]["handler_role_arn"], settings)
        rule = f"{cfg.prefix}-ha-{kind}"
        rule_arn = events.put_rule(Name=rule, State="ENABLED", EventPattern=json.dumps({
            "source": ["aws.autoscaling"], "detail-type": [HOOK_DETAIL_TYPES[kind]],
            "detail": {"AutoScalingGroupName": [cfg.asg_name]}}),
            Description=f"clusterflow {cfg.cluster}: {kind} lifecycle hook -> handler")["RuleArn"]
        events.put_targets(Rule=rule, Targets=[{"Id": "handler", "Arn": fn}])
        _allow_invoke(target, fn, "events.amazonaws.com", rule_arn, f"{kind}-hook")
        functions[kind] = fn
    # Every AZ, in config order: the group launches where capacity is, and a replacement
    # after an AZ loss lands in another one.
    zones = ",".join(c["subnets"][az] for az in cfg.availability_zones)
    group = dict(
        AutoScalingGroupName=cfg.asg_name, MinSize=1, MaxSize=1, DesiredCapacity=1,
        LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "$Latest"},
        VPCZoneIdentifier=zones, HealthCheckType="EC2",
        HealthCheckGracePeriod=cfg.asg.health_check_grace_s)
    tags = [{"Key": k, "Value": v, "PropagateAtLaunch": True}
            for k, v in _tags(cfg, hb.ROLE_HEAD).items()]
    existing = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[cfg.asg_name])
    if existing["AutoScalingGroups"]:
        asg.update_auto_scaling_group(**group)
    else:
        # Hooks given at creation cover the very first launch too.
        asg.create_auto_scaling_group(**group, Tags=tags,
                                      LifecycleHookSpecificationList=_hooks(cfg))
    for hook in _hooks(cfg):  # and kept current on every deploy
        asg.put_lifecycle_hook(AutoScalingGroupName=cfg.asg_name, **hook)
    return Deployment(
        cluster=cfg.cluster, design="asg", region=cfg.region, account=c["account"],
        subnets=c["subnets"], security_group_id=c["sg"],
        eip_allocation_id=c["eip"]["allocation_id"], public_ip=c["eip"]["public_ip"],
        roles=c["roles"], functions=functions, launch_template_id=lt_id,
        asg_name=cfg.asg_name)


def deploy(target: AwsTarget, cfg: HaConfig, wait_delay: int = 5) -> Deployment:
    return (deploy_standby if cfg.design == "standby" else deploy_asg)(target, cfg, wait_delay)
