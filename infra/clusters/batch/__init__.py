"""AWS Batch multi-node parallel (MNP) with EFA: pure request bodies and limits (`bodies`), the
control plane converged idempotently (`provision`), one job's submit/watch/stop (`jobs`), and
what they share (`common`). It provisions Batch only: the image's entry point is
`infra.clusters.batch_mnp_entry`, the config model `infra.clusters.batch_config`.
"""

from __future__ import annotations

from infra.clusters.batch.bodies import (
    check_node_properties,
    compute_resources,
    fsx_user_data,
    job_definition_request,
    launch_template_data,
    node_properties,
    nodes_for,
)
from infra.clusters.batch.common import (
    CANCEL_REASON,
    HASH_TAG,
    BatchDriftError,
    BatchEnvironment,
    BatchError,
    BatchLimitError,
    Progress,
)
from infra.clusters.batch.jobs import (
    describe_job,
    failure_reason,
    job_name,
    job_state,
    submit,
    terminate,
)
from infra.clusters.batch.provision import delete_environment, ensure_environment, preflight

__all__ = ["CANCEL_REASON", "HASH_TAG", "BatchDriftError", "BatchEnvironment", "BatchError",
           "BatchLimitError", "Progress", "check_node_properties", "compute_resources",
           "delete_environment", "describe_job", "ensure_environment", "failure_reason",
           "fsx_user_data", "job_definition_request", "job_name", "job_state",
           "launch_template_data", "node_properties", "nodes_for", "preflight", "submit",
           "terminate"]
