"""The one key under which a single-kernel result is reused (``reuse_result``).

Shared by every way the pipeline runs the kernel (``flows.pipeline``, and through a cluster's
FSx ``flows.fsx_staging``), so a result computed one way is found by the other: what the
result depends on is the same whatever backend or staging produced it.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.context import TaskRunContext

    from flows.spec import PipelineSpec


def result_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """With ``reuse_result``: the kernel, its parameters and the input's bytes, nothing else.

    Ranks and backend are left out on purpose: every kernel gives the same bits for any rank
    count, so a result computed on 64 ranks is the answer for 2. The results location is in,
    because reuse means fetching the earlier run's published files from there.
    """
    spec: PipelineSpec = parameters["spec"]
    if not spec.reuse_result:
        return None
    identity = {
        "kernel": spec.kernel.name,
        "parameters": spec.kernel.parameters.model_dump(mode="json"),
        "input_sha256": parameters["input_sha256"],
        "results": [spec.storage.results_bucket, spec.storage.results_prefix],
    }
    blob = json.dumps(identity, sort_keys=True).encode()
    return "clusterflow-result-" + hashlib.sha256(blob).hexdigest()
