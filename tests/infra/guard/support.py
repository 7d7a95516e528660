"""A cluster network on the embedded endpoint for the guard tests: a VPC (IPv4 + IPv6), two
head/login subnets sharing one NACL with allow rules at 100, a third subnet with its own NACL,
a REGIONAL web ACL in the cluster's region and a CLOUDFRONT one (us-east-1), an alerts topic
with a queue subscribed, and the guard config that names them all."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from infra.aws.clients import AwsTarget
from infra.guard.config import GuardConfig

ADMIN = "198.51.100.0/24"


def tag() -> str:
    return uuid.uuid4().hex[:8]


@dataclass
class Net:
    aws: AwsTarget
    t: str
    vpc: str
    vpc_cidr: str
    vpc_v6: str
    subnets: list[str]
    shared_acl: str
    own_acl: str
    groups: list[str]
    alerts_queue: str
    cfg: GuardConfig
    config_path: Path

    def entries(self, acl: str) -> list[dict[str, Any]]:
        acl_doc = self.aws.client("ec2").describe_network_acls(NetworkAclIds=[acl])
        return sorted(acl_doc["NetworkAcls"][0]["Entries"],
                      key=lambda e: (e["Egress"], e["RuleNumber"]))

    def addresses(self, scope: str, version: int) -> list[str]:
        region = "us-east-1" if scope == "CLOUDFRONT" else self.cfg.region
        waf = AwsTarget(region=region, endpoint_url=self.aws.endpoint_url).client("wafv2")
        name = self.cfg.ip_set_name(version)
        summary = next(s for s in waf.list_ip_sets(Scope=scope, Limit=100)["IPSets"]
                       if s["Name"] == name)
        return sorted(waf.get_ip_set(Name=name, Scope=scope, Id=summary["Id"])["IPSet"]
                      ["Addresses"])

    def alerts(self) -> list[dict[str, Any]]:
        sqs = self.aws.client("sqs")
        out = []
        while True:
            msgs = sqs.receive_message(QueueUrl=self.alerts_queue, MaxNumberOfMessages=10
                                       ).get("Messages", [])
            if not msgs:
                return out
            for m in msgs:
                out.append(json.loads(m["Body"]))
                sqs.delete_message(QueueUrl=self.alerts_queue, ReceiptHandle=m["ReceiptHandle"])


def _allow_all(ec2: Any, acl: str) -> None:
    for egress in (False, True):
        ec2.create_network_acl_entry(NetworkAclId=acl, RuleNumber=100, Protocol="-1",
                                     RuleAction="allow", Egress=egress, CidrBlock="0.0.0.0/0")
        ec2.create_network_acl_entry(NetworkAclId=acl, RuleNumber=101, Protocol="-1",
                                     RuleAction="allow", Egress=egress,
                                     Ipv6CidrBlock="::/0")


def _web_acl(aws: AwsTarget, region: str, scope: str, name: str) -> None:
    waf = AwsTarget(region=region, endpoint_url=aws.endpoint_url).client("wafv2")
    vis = {"SampledRequestsEnabled": False, "CloudWatchMetricsEnabled": False,
           "MetricName": name}
    waf.create_web_acl(Name=name, Scope=scope, DefaultAction={"Allow": {}},
                       VisibilityConfig=vis, Description="portal", Rules=[{
                           "Name": "rate", "Priority": 10, "Action": {"Block": {}},
                           "VisibilityConfig": {**vis, "MetricName": "rate"},
                           "Statement": {"RateBasedStatement": {
                               "Limit": 1000, "AggregateKeyType": "IP"}}}])


def make_net(aws: AwsTarget, tmp: Path, region: str = "us-west-2", **overrides: Any) -> Net:
    t = tag()
    target = AwsTarget(region=region, endpoint_url=aws.endpoint_url, embedded=True)
    ec2 = target.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]
    v6 = vpc["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"]
    subnets = [ec2.create_subnet(VpcId=vpc["VpcId"], CidrBlock=f"10.42.{i}.0/24")["Subnet"]
               ["SubnetId"] for i in range(3)]
    tags = [{"ResourceType": "network-acl",
             "Tags": [{"Key": "clusterflow:cluster", "Value": t}]}]
    shared = ec2.create_network_acl(VpcId=vpc["VpcId"], TagSpecifications=tags
                                    )["NetworkAcl"]["NetworkAclId"]
    own = ec2.create_network_acl(VpcId=vpc["VpcId"], TagSpecifications=tags
                                 )["NetworkAcl"]["NetworkAclId"]
    default = ec2.describe_network_acls(Filters=[
        {"Name": "association.subnet-id", "Values": subnets}])["NetworkAcls"][0]
    for assoc in default["Associations"]:
        if assoc["SubnetId"] in subnets:
            new = own if assoc["SubnetId"] == subnets[2] else shared
            ec2.replace_network_acl_association(
                AssociationId=assoc["NetworkAclAssociationId"], NetworkAclId=new)
    _allow_all(ec2, shared)
    _allow_all(ec2, own)
    sg = ec2.create_security_group(GroupName=f"head-{t}", Description="head node",
                                   VpcId=vpc["VpcId"])["GroupId"]
    _web_acl(aws, region, "REGIONAL", f"alb-{t}")
    _web_acl(aws, "us-east-1", "CLOUDFRONT", f"cf-{t}")
    sns, sqs = target.client("sns"), target.client("sqs")
    topic = sns.create_topic(Name=f"alerts-{t}")["TopicArn"]
    queue = sqs.create_queue(QueueName=f"alerts-{t}")["QueueUrl"]
    qarn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"]
                                    )["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=qarn,
                  Attributes={"RawMessageDelivery": "true"})
    raw: dict[str, Any] = {
        "region": region, "subnets": subnets, "security_groups": [sg],
        "web_acls": [{"name": f"alb-{t}", "scope": "REGIONAL", "priority": 0},
                     {"name": f"cf-{t}", "scope": "CLOUDFRONT", "priority": 0}],
        "allowlist": [ADMIN], "registry_table": f"guard-{t}", "alerts_topic": f"alerts-{t}",
        "name_prefix": f"guard-{t}", "default_ttl": "1h", "auto_block_ttl": "1h",
    }
    raw.update(overrides)
    path = tmp / f"guard-{t}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Net(target, t, vpc["VpcId"], "10.42.0.0/16", v6, subnets, shared, own, [sg],
               queue, GuardConfig(**raw), path)
