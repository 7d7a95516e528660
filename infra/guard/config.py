"""The guard's one config file: which subnets' NACLs, which web ACLs, what is never blocked.

Example (``cluster_configs/guard/guard.yaml``)::

    region: us-east-1
    subnets: [subnet-0abc...]            # the head/login subnets: their NACLs get deny entries
    security_groups: [sg-0abc...]        # audited / locked down (security groups cannot deny)
    web_acls:
      - {name: results-portal, scope: CLOUDFRONT}          # WAF on the CloudFront distribution
      - {name: prefect-alb, scope: REGIONAL, behind_cloudfront: true}
    allowlist: [198.51.100.0/24]         # your admin network; the VPC CIDRs are added
    auto_block_ttl: 24h

Everything is validated before a single AWS call: a bad CIDR, an unknown field, a priority
clash between two web ACL entries are refused with the field named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from infra.guard.cidr import GuardInputError, Network, parse_cidr, parse_ttl
from infra.yaml_models import load_yaml_model

DEFAULT_CONFIG_ENV = "CLUSTERFLOW_GUARD_CONFIG"
# SSH, slurmctld/slurmd/slurmdbd, MySQL/MariaDB (slurmdbd's store), PostgreSQL (Prefect's).
SENSITIVE_PORTS = [22, 6817, 6818, 6819, 3306, 5432]


class GuardConfigError(ValueError):
    """The guard config is invalid; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NaclSettings(_Strict):
    # Deny entries also outbound: stops one-way traffic (UDP, exfiltration) to the address,
    # which an inbound deny alone does not (see README, "Guarding the cluster").
    outbound: bool = True
    # AWS's default quota: 20 entries per direction per NACL (adjustable up to 40).
    entry_limit: int = Field(20, ge=1, le=40)
    # The lowest rule number the guard may use; it allocates upward, below the first allow.
    first_rule: int = Field(1, ge=1, le=32766)


class WebAclRef(_Strict):
    name: str = Field(pattern=r"^[\w-]{1,128}$")
    scope: Literal["REGIONAL", "CLOUDFRONT"]
    # An ALB behind CloudFront sees CloudFront's addresses: match the client's address in
    # the forwarded-IP header instead of the connection's source.
    behind_cloudfront: bool = False
    forwarded_ip_header: str = Field("X-Forwarded-For", pattern=r"^[A-Za-z0-9-]{1,255}$")
    priority: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _scope(self) -> WebAclRef:
        if self.scope == "CLOUDFRONT" and self.behind_cloudfront:
            raise ValueError(f"web ACL {self.name}: a CLOUDFRONT web ACL is CloudFront itself "
                             "and already sees the viewer's address; drop behind_cloudfront")
        return self


class GuardConfig(_Strict):
    region: str = "us-east-1"
    subnets: list[str] = Field(default_factory=list)
    security_groups: list[str] = Field(default_factory=list)
    web_acls: list[WebAclRef] = Field(default_factory=list)
    allowlist: list[str] = Field(default_factory=list)
    # The VPC CIDRs of the subnets are never blocked either (looked up, not typed in).
    allow_vpc_cidrs: bool = True
    nacl: NaclSettings = NaclSettings()
    sensitive_ports: list[int] = Field(default_factory=lambda: list(SENSITIVE_PORTS))
    default_ttl: str = "24h"
    auto_block_ttl: str = "24h"
    registry_table: str = Field("clusterflow-guard", pattern=r"^[A-Za-z0-9_.-]{3,255}$")
    alerts_topic: str = "clusterflow-security-alerts"
    name_prefix: str = Field("clusterflow-guard", pattern=r"^[A-Za-z][\w-]{0,100}$")

    @field_validator("subnets")
    @classmethod
    def _subnets(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if not s.startswith("subnet-")]
        if bad:
            raise ValueError(f"{bad} are not subnet ids (subnet-...)")
        return v

    @field_validator("security_groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if not s.startswith("sg-")]
        if bad:
            raise ValueError(f"{bad} are not security group ids (sg-...)")
        return v

    @field_validator("allowlist")
    @classmethod
    def _allowlist(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                parse_cidr(item)
            except GuardInputError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("default_ttl", "auto_block_ttl")
    @classmethod
    def _ttl(cls, v: str) -> str:
        try:
            parse_ttl(v)
        except GuardInputError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("sensitive_ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        if any(not 0 < p < 65536 for p in v):
            raise ValueError("ports are 1-65535")
        return v

    @model_validator(mode="after")
    def _unique(self) -> GuardConfig:
        keys = [(w.scope, w.name) for w in self.web_acls]
        dupes = sorted({f"{s}/{n}" for s, n in keys if keys.count((s, n)) > 1})
        if dupes:
            raise ValueError(f"web ACLs listed twice: {', '.join(dupes)}")
        return self

    def allowlist_networks(self) -> list[Network]:
        return [parse_cidr(c) for c in self.allowlist]

    def ip_set_name(self, version: int) -> str:
        return f"{self.name_prefix}-v{version}"

    @property
    def rule_name(self) -> str:
        return f"{self.name_prefix}-block"


def config_path(path: Path | str | None = None) -> Path:
    """The config to read: ``--config``, ``$CLUSTERFLOW_GUARD_CONFIG`` or ``./guard.yaml``."""
    return Path(path or os.environ.get(DEFAULT_CONFIG_ENV) or "guard.yaml")


def load_guard_config(path: Path | str | None = None) -> GuardConfig:
    return load_yaml_model(config_path(path), GuardConfig, what="guard config",
                           error=GuardConfigError)
