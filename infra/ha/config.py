"""Which head-node recovery design a cluster uses, and its knobs, validated before anything exists.

Both designs keep the controller's state on one shared EBS volume and one Elastic IP as the
cluster's stable address; they differ in what stands by:

- ``standby``: a second, stopped instance in another AZ; a CloudWatch alarm on
  ``StatusCheckFailed`` invokes a handler that fences the primary, moves the state (snapshot ->
  volume in the standby's AZ), starts the standby and moves the EIP.
- ``asg``: nothing stands by; an Auto Scaling group of exactly one instance across >= 2 AZs
  replaces a dead head, a terminate lifecycle hook snapshots the volume and a launch hook (and
  the user data) restore it in whichever AZ the replacement landed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from infra.backends.shell_safety import PLAIN_PATH, NoControlChars

Design = Literal["standby", "asg"]


class HaConfigError(ValueError):
    """The HA config is invalid; the message names the field."""


class SharedVolume(NoControlChars):
    model_config = ConfigDict(extra="forbid")

    size_gib: int = Field(16, ge=1, le=16384)
    volume_type: Literal["gp3", "gp2", "io2", "io1"] = "gp3"
    device: str = Field("/dev/sdf", pattern=r"^/dev/(sd|xvd)[f-p]$")
    # Written into the user data's settings and mounted at boot: a plain absolute path.
    mount_point: str = Field("/shared", pattern=PLAIN_PATH)


class StandbySettings(NoControlChars):
    model_config = ConfigDict(extra="forbid")

    # StatusCheckFailed is published every minute; two bad minutes before failing over avoids
    # flapping on a single lost data point.
    alarm_period_s: Literal[60, 300] = 60
    alarm_evaluation_periods: int = Field(2, ge=1, le=10)


class AsgSettings(NoControlChars):
    model_config = ConfigDict(extra="forbid")

    # How long an instance may sit in Pending:Wait / Terminating:Wait for its handler.
    lifecycle_heartbeat_s: int = Field(600, ge=30, le=7200)
    health_check_grace_s: int = Field(300, ge=0)


class HaConfig(NoControlChars):
    """One cluster's head-node HA; ``design`` picks standby or asg."""

    model_config = ConfigDict(extra="forbid")

    cluster: str = Field(pattern=r"^[a-z][a-z0-9-]{0,39}$")
    design: Design = "standby"
    region: str = "us-east-1"
    availability_zones: list[str] = Field(
        default_factory=lambda: ["us-east-1a", "us-east-1b"], min_length=2)
    # Existing subnets, one per AZ in the same order. Empty: a VPC and subnets are created
    # (only on the embedded endpoint; a real account must name its own network).
    subnet_ids: list[str] = Field(default_factory=list)
    instance_type: str = "t3.medium"
    image_id: str | None = None  # None: the latest Amazon Linux 2023 from SSM
    image_parameter: str = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
    shared_volume: SharedVolume = Field(default_factory=SharedVolume)
    keep_snapshots: int = Field(5, ge=1, le=1000)
    standby: StandbySettings = Field(default_factory=StandbySettings)
    asg: AsgSettings = Field(default_factory=AsgSettings)

    @model_validator(mode="after")
    def _check(self) -> HaConfig:
        if len(set(self.availability_zones)) != len(self.availability_zones):
            raise ValueError("availability_zones must be distinct")
        for az in self.availability_zones:
            if not az.startswith(self.region):
                raise ValueError(f"availability zone {az} is not in region {self.region}")
        if self.subnet_ids and len(self.subnet_ids) != len(self.availability_zones):
            raise ValueError("subnet_ids must list one subnet per availability zone, in order")
        return self

    # Names derived from the cluster, in one place so policies and code agree.
    @property
    def prefix(self) -> str:
        return f"clusterflow-{self.cluster}"

    @property
    def asg_name(self) -> str:
        return f"{self.prefix}-head"

    @property
    def alarm_name(self) -> str:
        return f"{self.prefix}-head-status"

    @property
    def instance_role(self) -> str:
        return f"{self.prefix}-head"

    @property
    def handler_role(self) -> str:
        return f"{self.prefix}-ha-handler"


def load_ha_config(path: Path, **overrides: object) -> HaConfig:
    """Read a YAML HA config; errors name the field (``shared_volume.size_gib: ...``)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise HaConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise HaConfigError(f"{path}: expected a mapping at the top level")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_ha_config(raw)


def parse_ha_config(raw: dict[str, object]) -> HaConfig:
    try:
        return HaConfig.model_validate(raw)
    except ValidationError as e:
        msgs = [f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                for err in e.errors()]
        raise HaConfigError("; ".join(msgs)) from None
