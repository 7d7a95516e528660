"""What every part of the Batch MNP code shares: its errors, the environment it converges on,
the tags that mark (and hash) what clusterflow created."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from infra.clusters.batch_config import BatchMnpConfig

Progress = Callable[[str], None]
HASH_TAG = "clusterflow:sha256"
CANCEL_REASON = "cancelled by clusterflow"


class BatchError(RuntimeError):
    """AWS Batch refused or failed something; the message says what and what to do."""


class BatchLimitError(BatchError):
    """A documented AWS Batch multi-node limit would be exceeded."""


class BatchDriftError(BatchError):
    """A resource with clusterflow's name exists with different settings."""


@dataclass(frozen=True)
class BatchEnvironment:
    config: BatchMnpConfig
    placement_group: str
    launch_template_id: str
    compute_environment_arn: str
    job_queue_arn: str
    job_definition_arn: str


def _quiet(_: str) -> None:
    pass


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _sha256(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _tags(cfg: BatchMnpConfig) -> dict[str, str]:
    return {"clusterflow:environment": cfg.name, **cfg.tags}
