"""Look-ups that catch what only the account knows, before anything is created.

A missing subnet or key pair, an instance type not offered in the subnet's Availability Zone:
on AWS these surface minutes into a CloudFormation stack or as a compute environment stuck in
INVALID. Checked up front, each becomes one line that says what to do. Every call here only
describes; filters (not ID lists) are used so that one missing ID does not hide the others.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from infra.aws.clients import AwsTarget


@dataclass
class Preflight:
    aws: AwsTarget
    _offerings: dict[str, set[str]] = field(default_factory=dict)

    @property
    def region(self) -> str:
        return self.aws.region

    def _ec2(self) -> Any:
        return self.aws.client("ec2")

    def subnet_azs(self, subnet_ids: Iterable[str]) -> dict[str, str]:
        """subnet id -> Availability Zone, for the subnets that exist."""
        ids = sorted(set(subnet_ids))
        if not ids:
            return {}
        pages = self._ec2().get_paginator("describe_subnets").paginate(
            Filters=[{"Name": "subnet-id", "Values": ids}])
        return {s["SubnetId"]: s["AvailabilityZone"] for p in pages for s in p["Subnets"]}

    def missing_subnet_message(self, subnet_id: str) -> str:
        return (f"subnet '{subnet_id}' does not exist in {self.region}: use one of your subnets "
                f"(aws ec2 describe-subnets --region {self.region}) or create one")

    def key_pair_exists(self, name: str) -> bool:
        found = self._ec2().describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])
        return bool(found["KeyPairs"])

    def missing_key_pair_message(self, name: str) -> str:
        return (f"key pair '{name}' does not exist in {self.region}: create it with "
                f"'aws ec2 create-key-pair --key-name {name} --region {self.region}' (or import "
                f"your public key with 'aws ec2 import-key-pair'), or name an existing one")

    def missing_security_groups(self, group_ids: Iterable[str]) -> list[str]:
        ids = sorted(set(group_ids))
        if not ids:
            return []
        found = self._ec2().describe_security_groups(
            Filters=[{"Name": "group-id", "Values": ids}])["SecurityGroups"]
        return sorted(set(ids) - {g["GroupId"] for g in found})

    def missing_security_group_message(self, group_id: str) -> str:
        return (f"security group '{group_id}' does not exist in {self.region}: use one of yours "
                f"(aws ec2 describe-security-groups --region {self.region}) or create one")

    def offered_in(self, instance_type: str) -> set[str]:
        """The Availability Zones of this region that offer ``instance_type``."""
        if instance_type not in self._offerings:
            pages = self._ec2().get_paginator("describe_instance_type_offerings").paginate(
                LocationType="availability-zone",
                Filters=[{"Name": "instance-type", "Values": [instance_type]}])
            self._offerings[instance_type] = {
                o["Location"] for p in pages for o in p["InstanceTypeOfferings"]}
        return self._offerings[instance_type]

    def not_offered_message(self, instance_type: str, az: str, subnet_id: str) -> str:
        where = sorted(self.offered_in(instance_type))
        elsewhere = (f"; it is offered in {', '.join(where)}" if where
                     else f"; no Availability Zone of {self.region} offers it")
        return f"{instance_type} is not offered in {az} (subnet {subnet_id}){elsewhere}"
