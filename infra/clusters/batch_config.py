"""The clusterflow config for an AWS Batch multi-node parallel (MNP) environment with EFA.

ParallelCluster 3.16 only accepts ``Scheduler: slurm``, so clusterflow provisions Batch itself
(``infra.clusters.batch``). This model holds what that needs and refuses, before anything is
created, what Batch documents as unsupported for MNP jobs:

- Spot compute environments ("Multi-node parallel jobs aren't supported on compute
  environments that use Spot Instances");
- more than one instance type ("all node groups in a multi-node parallel job must use the same
  instance type"), more than 1,000 nodes, more than five security groups;
- EFA on an instance type without EFA, more EFA interfaces than the type has, GPUs on a type
  without them;
- subnets in more than one Availability Zone (a cluster placement group lives in one AZ). With
  several subnets their AZs must be known: ``subnet_azs`` in the file, or an AWS look-up
  (``clusterflow validate --check-aws``; provisioning always looks them up).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator

from infra.aws.clients import AwsTarget
from infra.aws.preflight import Preflight
from infra.aws.regions import region_problem
from infra.backends.shell_safety import PLAIN_PATH, NoControlChars
from infra.clusters import instance_types
from infra.clusters.config_issues import ConfigInvalid, ConfigIssue, load_yaml_mapping, path_of

KIND = "batch-mnp"
MAX_NODES = 1000  # per job: the default limit of instances in the job's ECS cluster
MAX_NODE_GROUPS = 5
MAX_SECURITY_GROUPS = 5
SubnetId = Annotated[str, Field(pattern=r"^subnet-[0-9a-f]{8,17}$")]
SecurityGroupId = Annotated[str, Field(pattern=r"^sg-[0-9a-f]{8,17}$")]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,100}$"  # leaves room for "-queue" etc. in 128


class _Strict(NoControlChars):
    # Values reach user data, job definitions and commands: no control characters.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Volume(_Strict):
    """A host directory (e.g. an FSx for Lustre mount) made visible inside every node."""

    host_path: str = Field(pattern=r"^/")
    container_path: str = Field(pattern=r"^/")
    read_only: bool = False


class FsxMount(_Strict):
    """An existing FSx for Lustre file system, mounted on every instance at boot."""

    dns_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]*$",
                          description="fs-....fsx.<region>.amazonaws.com")
    mount_name: str = Field(pattern=r"^[A-Za-z0-9_]+$",
                            description="the file system's MountName (e.g. abcdefgh)")
    mount_point: str = Field("/fsx", pattern=PLAIN_PATH)


class Container(_Strict):
    image: str = Field(min_length=1)
    vcpus: int | None = Field(None, ge=1, description="default: all of the instance's vCPUs")
    memory_mib: int | None = Field(None, ge=4, description="default: 90% of the instance's")
    gpus: int = Field(0, ge=0)
    entry: list[str] = Field(
        default_factory=lambda: ["python3", "/opt/clusterflow/batch_mnp_entry.py"],
        min_length=1,
        description="How infra/clusters/batch_mnp_entry.py is started inside the image.",
    )
    python: str = Field("python3", description="The image's interpreter for the MPI kernel.")
    mpirun: list[str] = Field(default_factory=lambda: ["mpirun"], min_length=1)
    mpirun_args: list[str] = Field(default_factory=list)
    environment: dict[str, str] = Field(default_factory=dict)
    volumes: list[Volume] = Field(default_factory=list)
    user: str | None = None


class BatchMnpConfig(_Strict):
    kind: Literal["batch-mnp"]
    name: str = Field(pattern=NAME_PATTERN, description="prefix of every resource created")
    region: str = "us-east-1"
    instance_type: str
    capacity_type: Literal["ON_DEMAND"] = Field(
        "ON_DEMAND", description="MNP jobs cannot run on Spot compute environments")
    max_nodes: int = Field(8, ge=2, le=MAX_NODES)
    ranks_per_node: int | None = Field(None, ge=1,
                                       description="default: the instance's physical cores")
    subnets: list[SubnetId] = Field(min_length=1)
    subnet_azs: dict[str, str] = Field(default_factory=dict)
    security_group_ids: list[SecurityGroupId] = Field(min_length=1,
                                                      max_length=MAX_SECURITY_GROUPS)
    instance_role: str = Field(description="instance profile name or ARN (ecsInstanceRole)")
    service_role: str | None = Field(
        None, description="default: Batch's service-linked role (AWSServiceRoleForBatch)")
    key_pair: str | None = None
    image_id: str | None = Field(None, description="AMI with the EFA driver; default Batch's")
    efa: bool = True
    efa_interfaces: int | None = Field(None, ge=1,
                                       description="default: every EFA the instance type has")
    fsx: FsxMount | None = None
    container: Container
    attempts: int = Field(1, ge=1, le=10, description="the older spelling of "
                          "max_interruptions + 1 (attempts: 2 is max_interruptions: 1)")
    max_interruptions: int | None = Field(
        None, ge=0, le=9, description="retries after the job's instance went away (status "
        "reason 'Host EC2*': a reclaim, a retirement); any other failure is final. "
        "Default: attempts - 1")
    timeout_minutes: int | None = Field(None, ge=1)
    log_group: str = "/aws/batch/job"
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        """Refused here, not by botocore's InvalidRegionError traceback at the first call."""
        problem = region_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @property
    def interruptions_allowed(self) -> int:
        """Retries on host loss: ``max_interruptions``, else ``attempts - 1``."""
        if self.max_interruptions is not None:
            return self.max_interruptions
        return self.attempts - 1

    # Derived settings, one place for the sizing rules.
    @property
    def instance(self) -> instance_types.InstanceType:
        return instance_types.lookup(self.instance_type)

    @property
    def slots_per_node(self) -> int:
        return self.ranks_per_node or self.instance.cores

    @property
    def node_vcpus(self) -> int:
        return self.container.vcpus or self.instance.vcpus

    @property
    def node_memory_mib(self) -> int:
        # The ECS agent and the OS keep part of the memory; asking for all of it never places.
        return self.container.memory_mib or int(self.instance.memory_mib * 0.9)

    @property
    def efa_devices(self) -> int:
        if not self.efa:
            return 0
        return self.efa_interfaces or self.instance.efa_interfaces

    def resource_names(self) -> dict[str, str]:
        n = self.name
        return {"placement_group": f"{n}-pg", "launch_template": f"{n}-lt",
                "compute_environment": f"{n}-ce", "job_queue": f"{n}-queue",
                "job_definition": f"{n}-jobdef"}


def _raw_issues(raw: Mapping[str, Any]) -> list[ConfigIssue]:
    """Documented Batch limits, said in Batch's words rather than as a schema mismatch."""
    issues = []
    if "instance_types" in raw:
        issues.append(ConfigIssue("instance_types", "AWS Batch multi-node parallel jobs use one "
                                  "instance type per job (all node groups must use the same "
                                  "type): replace instance_types with instance_type"))
    if str(raw.get("capacity_type", "ON_DEMAND")).upper() in ("SPOT", "EC2_SPOT"):
        issues.append(ConfigIssue("capacity_type", "AWS Batch does not run multi-node parallel "
                                  "jobs on Spot compute environments: use ON_DEMAND, or the "
                                  "parallelcluster backend for Spot"))
    if raw.get("max_interruptions") is not None and raw.get("attempts", 1) != 1:
        issues.append(ConfigIssue("attempts", "attempts and max_interruptions both bound "
                                  "retries: keep max_interruptions and remove attempts"))
    nodes = raw.get("max_nodes")
    if isinstance(nodes, int) and nodes > MAX_NODES:
        issues.append(ConfigIssue("max_nodes", f"{nodes} nodes: an AWS Batch multi-node job has "
                                  f"at most {MAX_NODES} nodes (the default instance limit of its "
                                  "ECS cluster; ask AWS for an increase first)"))
    return issues


def instance_issues(cfg: BatchMnpConfig) -> list[ConfigIssue]:
    """The instance type exists and has what the config asks of it (EFA, GPUs, size)."""
    try:
        it = instance_types.lookup(cfg.instance_type)
    except instance_types.UnknownInstanceType as e:
        if e.known_name:  # a real type, but nodes are sized from its vCPUs and EFA count
            return [ConfigIssue("instance_type", f"{e}; Batch nodes are sized from those facts: "
                                "pick a type the catalog describes")]
        return [ConfigIssue("instance_type", f"{e} (if it is new, regenerate infra/clusters/data/"
                            "instance_types.json with 'python -m infra.clusters.instance_types')")]
    issues = []
    if cfg.efa and not it.efa:
        issues.append(ConfigIssue("instance_type", f"instance type '{it.name}' does not support "
                                  "EFA: pick an EFA type (e.g. c5n.18xlarge, c6in.32xlarge, "
                                  "hpc7a.96xlarge, p4d.24xlarge) or set efa: false"))
    if cfg.efa_interfaces and it.efa and cfg.efa_interfaces > it.efa_interfaces:
        issues.append(ConfigIssue("efa_interfaces", f"{cfg.efa_interfaces} EFA interfaces but "
                                  f"{it.name} has at most {it.efa_interfaces}"))
    if not it.cluster_placement:
        issues.append(ConfigIssue("instance_type", f"{it.name} cannot be launched in a cluster "
                                  "placement group, which multi-node jobs need"))
    c = cfg.container
    if c.gpus > it.gpus:
        issues.append(ConfigIssue("container.gpus", f"{c.gpus} GPU(s) per node but {it.name} has "
                                  f"{it.gpus or 'none'}"))
    if c.vcpus and c.vcpus > it.vcpus:
        issues.append(ConfigIssue("container.vcpus", f"{c.vcpus} exceeds {it.name}'s {it.vcpus}"))
    if c.memory_mib and c.memory_mib > it.memory_mib:
        issues.append(ConfigIssue("container.memory_mib", f"{c.memory_mib} MiB exceeds "
                                  f"{it.name}'s {it.memory_mib} MiB"))
    return issues


def subnet_issues(cfg: BatchMnpConfig, azs: Mapping[str, str]) -> list[ConfigIssue]:
    if len(set(cfg.subnets)) < 2:
        return []
    known = {s: azs[s] for s in cfg.subnets if s in azs}
    if len(known) < len(set(cfg.subnets)):
        return [ConfigIssue("subnets", "several subnets but their Availability Zones are "
                            "unknown; a cluster placement group needs one AZ: list one subnet, "
                            "add subnet_azs, or check against AWS (clusterflow validate "
                            "--check-aws)")]
    if len(set(known.values())) > 1:
        where = ", ".join(f"{s} in {az}" for s, az in known.items())
        return [ConfigIssue("subnets", f"the subnets span several Availability Zones ({where}); "
                            "a cluster placement group (and EFA) needs one AZ: keep the "
                            "subnets of one AZ")]
    return []


def aws_issues(cfg: BatchMnpConfig, preflight: Preflight) -> tuple[list[ConfigIssue],
                                                                   dict[str, str]]:
    issues: list[ConfigIssue] = []
    azs = preflight.subnet_azs(cfg.subnets)
    issues += [ConfigIssue(f"subnets[{k}]", preflight.missing_subnet_message(s))
               for k, s in enumerate(cfg.subnets) if s not in azs]
    missing_sgs = set(preflight.missing_security_groups(cfg.security_group_ids))
    issues += [ConfigIssue(f"security_group_ids[{k}]", preflight.missing_security_group_message(g))
               for k, g in enumerate(cfg.security_group_ids) if g in missing_sgs]
    if cfg.key_pair and not preflight.key_pair_exists(cfg.key_pair):
        issues.append(ConfigIssue("key_pair", preflight.missing_key_pair_message(cfg.key_pair)))
    for k, s in enumerate(cfg.subnets):
        if s in azs and azs[s] not in preflight.offered_in(cfg.instance_type):
            issues.append(ConfigIssue(f"subnets[{k}]", preflight.not_offered_message(
                cfg.instance_type, azs[s], s)))
    return issues, azs


def validate_batch_config(raw: Mapping[str, Any], *, source: str = "<config>",
                          aws: AwsTarget | None = None) -> BatchMnpConfig:
    issues = _raw_issues(raw)
    try:
        cfg = BatchMnpConfig.model_validate(raw)
    except ValidationError as e:
        said = {i.path for i in issues}
        issues += [ConfigIssue(path_of(err["loc"]), _msg(err)) for err in e.errors()
                   if path_of(err["loc"]) not in said]
        raise ConfigInvalid(source, issues) from None
    issues += instance_issues(cfg)
    if issues:
        raise ConfigInvalid(source, issues)
    azs = dict(cfg.subnet_azs)
    if aws is not None:
        online, found = aws_issues(cfg, Preflight(dataclasses.replace(aws, region=cfg.region)))
        issues += online
        azs.update(found)
    issues = subnet_issues(cfg, azs) + issues
    if issues:
        raise ConfigInvalid(source, issues)
    return cfg


def _msg(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def is_batch_config(raw: Mapping[str, Any]) -> bool:
    return raw.get("kind") == KIND


def load_batch_config(path: Path | str, **kwargs: Any) -> BatchMnpConfig:
    path = Path(path)
    return validate_batch_config(load_yaml_mapping(path), source=str(path), **kwargs)


def summary(cfg: BatchMnpConfig) -> str:
    it = cfg.instance
    efa = f", {cfg.efa_devices} EFA device(s)" if cfg.efa else ", no EFA"
    gpus = f", {cfg.container.gpus} GPU(s)/node" if cfg.container.gpus else ""
    return (f"AWS Batch multi-node config '{cfg.name}', region {cfg.region}: up to "
            f"{cfg.max_nodes} x {it.name} ({cfg.slots_per_node} ranks/node{efa}{gpus}) in a "
            f"cluster placement group, image {cfg.container.image}")
