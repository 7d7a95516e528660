"""The pipeline spec: one YAML file that says what to run, where, and where results go.

Validated up front by pydantic (unknown keys are errors) so a typo is refused before any
bucket, queue or process exists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
QUEUE_RE = re.compile(r"^[A-Za-z0-9_-]{1,75}$")

DEFAULT_SPEC = Path(__file__).parent / "specs" / "heat.yaml"


class SpecError(ValueError):
    """A pipeline spec that cannot be used; the message names every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeatParameters(_Strict):
    nx: int = Field(256, gt=0, le=65536)
    ny: int = Field(256, gt=0, le=65536)
    steps: int = Field(200, ge=0)
    alpha: float = Field(0.2, gt=0, le=0.25)


class Kernel(_Strict):
    name: Literal["heat"] = "heat"
    parameters: HeatParameters = HeatParameters()


class Storage(_Strict):
    input_bucket: str
    input_prefix: str = "inputs/"
    results_bucket: str
    results_prefix: str = "runs/"

    @field_validator("input_bucket", "results_bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        if not BUCKET_RE.match(v) or ".." in v:
            raise ValueError(f"{v!r} is not a valid S3 bucket name (3-63 chars, a-z 0-9 . -)")
        return v

    @field_validator("input_prefix", "results_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/") or "*" in v or "\\" in v:
            raise ValueError(f"{v!r} must be a relative key prefix without '..', '*' or '\\'")
        return v if not v or v.endswith("/") else v + "/"


class FanOut(_Strict):
    topic: str = "clusterflow-results"
    queues: list[str] = Field(default_factory=lambda: ["postprocess", "audit"], min_length=1)
    max_receive_count: int = Field(3, ge=1, le=1000)
    visibility_timeout: int = Field(300, ge=0, le=43200)

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
    kernel: Kernel = Kernel()
    ranks: int = Field(2, ge=1, le=4096)
    backend: Literal["local"] = "local"
    aws: Literal["embedded", "real"] = Field(
        "embedded",
        description="'embedded' runs against a local moto server (or AWS_ENDPOINT_URL); "
        "'real' talks to the AWS account in the standard credential chain.",
    )
    region: str = "us-east-1"
    storage: Storage
    scratch_dir: Path = Path(".clusterflow/scratch")
    fanout: FanOut = FanOut()

    @model_validator(mode="after")
    def _fits(self) -> PipelineSpec:
        p = self.kernel.parameters
        if self.ranks > p.nx * p.ny:
            raise ValueError(f"ranks={self.ranks} exceeds the {p.ny}x{p.nx} grid's cell count")
        return self


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def load_spec(path: Path | str, **overrides: object) -> PipelineSpec:
    """Read and validate a spec; ``overrides`` (e.g. ranks from the CLI) win over the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"pipeline spec {path} does not exist") from None
    except yaml.YAMLError as e:
        raise SpecError(f"pipeline spec {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"pipeline spec {path} must be a YAML mapping, got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"pipeline spec {path} is invalid:\n{_format_errors(e)}") from None
