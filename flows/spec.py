"""The pipeline spec: one YAML file that says what to run, where, and where results go.

Validated up front by pydantic (unknown keys are errors) so a typo is refused before any
bucket, queue or process exists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from flows.errors import SpecError
from flows.kernel_defaults import HeatDefaults, KmerDefaults, VarDefaults
from flows.resource_checks import LocalOptions, check_resources, check_scratch_dir
from flows.steps.graph import GraphError, Plan, build_plan
from flows.steps.model import StepSpec
from flows.watchdog import Budget
from infra.aws.naming import check_bucket_name, region_problem
from infra.backends.settings import BatchSettings, ParallelClusterSettings
from infra.backends.shell_safety import NoControlChars
from infra.yaml_models import load_yaml_model
from mpi_jobs.catalog import KERNELS, HeatParameters, KernelInfo

QUEUE_RE = re.compile(r"^[A-Za-z0-9_-]{1,75}$")

DEFAULT_SPEC = Path(__file__).parent / "specs" / "heat.yaml"

__all__ = ["DEFAULT_SPEC", "PipelineSpec", "SpecError", "load_spec"]


class _Strict(NoControlChars):
    # Spec values reach generated scripts (batch scripts, SSM commands): no control chars.
    model_config = ConfigDict(extra="forbid", frozen=True)


class _KernelBase(_Strict):
    input_key: str | None = Field(
        None, description="S3 key (in the input bucket) of your own input; default: a "
        "deterministic generated sample, uploaded once under input_prefix")
    checkpoint_every: int | None = Field(
        None, gt=0, strict=True,
        description="checkpoint every K steps/blocks into the run's scratch dir")
    retries: int = Field(0, ge=0, le=10, strict=True,
                         description="re-runs of a failed MPI job; with checkpoints each retry "
                         "resumes from the newest complete one")

    @field_validator("input_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and (not v or v.startswith("/") or ".." in v.split("/")
                              or "\\" in v or v.endswith("/")):
            raise ValueError(f"{v!r} must be an object key without '..', '\\' or a leading "
                             "or trailing '/'")
        return v


class HeatKernel(_KernelBase):
    name: Literal["heat"] = "heat"
    parameters: HeatDefaults = HeatDefaults()


class VarKernel(_KernelBase):
    name: Literal["var"]
    parameters: VarDefaults = VarDefaults()


class KmerKernel(_KernelBase):
    name: Literal["kmer"]
    parameters: KmerDefaults = KmerDefaults()


Kernel = Annotated[HeatKernel | VarKernel | KmerKernel, Field(discriminator="name")]


class SlurmOptions(_Strict):
    """How the slurm backend submits: one ``sbatch`` per run, ranks started by ``launcher``."""

    partition: str | None = None
    time_limit: str | None = Field(None, description="Slurm --time (minutes, HH:MM:SS, "
                                   "D-HH:MM:SS); a job past it is killed and the run fails")
    launcher: Literal["srun", "mpiexec"] = "srun"
    overcommit: bool = Field(False, strict=True,
                             description="more ranks than CPUs (a test machine only)")
    conf: Path | None = Field(None, description="slurm.conf; default $SLURM_CONF, the local "
                              "cluster of `make slurm`, else Slurm's own default")
    sbatch_args: list[str] = Field(default_factory=list)
    requeue: bool = Field(False, description="sbatch --requeue: a job whose node is lost (a "
                          "Spot reclaim) runs again and resumes from its newest checkpoint")
    max_interruptions: int = Field(3, ge=0, le=100, description="requeues before the job "
                                   "fails instead of resuming (bounds Spot spend)")

    @field_validator("time_limit")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        from infra.backends.providers.slurm import valid_time_limit

        if v is not None and not valid_time_limit(v):
            raise ValueError(f"{v!r} is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")
        return v


class Storage(_Strict):
    input_bucket: str
    input_prefix: str = "inputs/"
    results_bucket: str
    results_prefix: str = "runs/"

    @field_validator("input_bucket", "results_bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        return check_bucket_name(v)

    @field_validator("input_prefix", "results_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/") or "*" in v or "\\" in v:
            raise ValueError(f"{v!r} must be a relative key prefix without '..', '*' or '\\'")
        return v if not v or v.endswith("/") else v + "/"


class FanOut(_Strict):
    topic: str = "clusterflow-results"
    queues: list[str] = Field(default_factory=lambda: ["postprocess", "audit"], min_length=1)
    max_receive_count: int = Field(3, ge=1, le=1000, strict=True)
    visibility_timeout: int = Field(300, ge=0, le=43200, strict=True)

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        if not QUEUE_RE.match(v):
            raise ValueError(f"{v!r} is not a valid SNS topic name")
        return v

    @field_validator("queues")
    @classmethod
    def _queues(cls, v: list[str]) -> list[str]:
        for q in v:
            if not QUEUE_RE.match(q):
                raise ValueError(f"{q!r} is not a valid SQS queue name (letters, digits, - and _)")
        if len(set(v)) != len(v):
            raise ValueError("queue names must be unique")
        return v


class PipelineSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    kernel: Kernel = HeatKernel()
    ranks: int = Field(2, ge=1, le=4096, strict=True)
    backend: Literal["local", "slurm", "parallelcluster", "batch"] = "local"
    local: LocalOptions = LocalOptions()
    slurm: SlurmOptions = SlurmOptions()
    parallelcluster: ParallelClusterSettings | None = None
    batch: BatchSettings | None = None
    aws: Literal["embedded", "real"] = Field(
        "embedded",
        description="'embedded' runs against a local moto server (or AWS_ENDPOINT_URL); "
        "'real' talks to the AWS account in the standard credential chain.",
    )
    allow_unlisted_region: bool = Field(
        False, strict=True, description="accept a well-formed region that this botocore does "
        "not list yet (a region newer than it)")
    region: str = "us-east-1"
    storage: Storage
    scratch_dir: Path = Path(".clusterflow/scratch")
    fanout: FanOut = FanOut()
    reuse_result: bool = Field(
        False, strict=True, description="reuse the outputs of an earlier run with the same kernel, "
        "parameters and input bytes (any rank count gives the same bits) instead of running")
    steps: list[StepSpec] | None = Field(
        None, min_length=1, description="a graph of steps (bundled kernels and your own "
        "commands) instead of the single kernel; see the README's 'Steps and sweeps'")
    budget: Budget | None = Field(None, description="refuse a run estimated above max_usd; "
                                  "stop one whose spend passes it (see `clusterflow plan`)")

    @field_validator("region")
    @classmethod
    def _region(cls, v: str, info: ValidationInfo) -> str:
        problem = region_problem(v, allow_unlisted=info.data.get("allow_unlisted_region", False))
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("scratch_dir")
    @classmethod
    def _scratch(cls, v: Path) -> Path:
        return check_scratch_dir(v)

    @model_validator(mode="after")
    def _fits(self) -> PipelineSpec:
        p = self.kernel.parameters
        if isinstance(p, HeatParameters):
            cells = p.nx * p.ny * (p.nz or 1)
            if self.ranks > cells:
                shape = f"{p.ny}x{p.nx}" if p.nz is None else f"{p.nz}x{p.ny}x{p.nx}"
                raise ValueError(f"ranks={self.ranks} exceeds the {shape} grid's cell count")
        from flows.fsx_checks import fsx_refusal, on_parallelcluster, section_problem

        problem = section_problem(self)  # the spec's backend or any step's
        if problem is not None:
            raise ValueError(problem)
        if on_parallelcluster(self):
            # Either the run directory is the cluster's shared storage (clusterflow runs on
            # the head node), or the data stages through the cluster's FSx (flows.fsx_staging,
            # flows.steps.fsx): whether the spec's backend or only one step's is the cluster.
            problem = fsx_refusal(self)
            if problem is not None:
                raise ValueError(problem)
        return self

    @property
    def kernel_info(self) -> KernelInfo:
        return KERNELS[self.kernel.name]

    def step_list(self) -> list[StepSpec]:
        """``steps:``, with an explicitly given ``kernel:`` as a first step named ``kernel``.

        A spec that has only ``kernel:`` runs the classic single-job pipeline instead.
        """
        steps = list(self.steps or [])
        if self.steps and "kernel" in self.model_fields_set:
            k = self.kernel
            inputs = ({"input": f"s3://{self.storage.input_bucket}/{k.input_key}"}
                      if k.input_key else {})
            steps.insert(0, StepSpec(name="kernel", uses=k.name,
                                     parameters=k.parameters.model_dump(), inputs=inputs,
                                     checkpoint_every=k.checkpoint_every, retries=k.retries))
        return steps


def _untag_kernel(parts: list[str]) -> list[str]:
    if parts[:1] == ["kernel"] and parts[1:2] and parts[1] in KERNELS:
        del parts[1]  # pydantic adds the union's tag: kernel.heat.parameters.nx
    return parts


def load_spec(path: Path | str, **overrides: object) -> PipelineSpec:
    """Read and validate a spec; ``overrides`` (e.g. ranks from the CLI) win over the file.

    A spec with ``steps:`` is also checked as a graph (names, cycles, placeholders, inputs,
    executables). Then every job is checked against where it is sent (cores, memory), so
    every refusal happens here, before anything is created.
    """
    spec = load_yaml_model(path, PipelineSpec, what="pipeline spec", error=SpecError,
                           overrides=overrides, rename=_untag_kernel)
    where = f"pipeline spec {path}"
    if not spec.steps:
        check_resources(spec.kernel.name, spec.kernel.parameters, spec.ranks, spec.backend,
                        local=spec.local, where=where)
        return spec
    plan = step_plan(spec, Path(path))
    from flows.fsx_checks import steps_problems

    problems = steps_problems(spec, plan)
    if problems:
        raise SpecError(f"pipeline spec {path} is invalid:\n"
                        + "\n".join(f"  {line}" for line in problems))
    for step in plan.steps.values():
        ranks, backend = plan.ranks(step, spec.ranks), step.backend or spec.backend
        for point in plan.points[step.name]:
            at = f"{where}: steps.{step.name}" + (f"[{point.label}]" if point.label else "")
            params = step.kernel_parameters(point.params) if step.uses else {}
            check_resources(step.uses, params, ranks, backend, local=spec.local, where=at)
    return spec


def step_plan(spec: PipelineSpec, path: Path) -> Plan:
    """The spec's step graph, checked and expanded into points (SpecError if it cannot run)."""
    try:
        return build_plan(spec.step_list(), spec_dir=Path(path).resolve().parent,
                          default_backend=spec.backend, default_ranks=spec.ranks)
    except GraphError as e:
        raise SpecError(f"pipeline spec {path} is invalid:\n"
                        + "\n".join(f"  {line}" for line in str(e).splitlines())) from None
