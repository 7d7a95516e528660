"""Which way a cloud spec's data reaches the ranks, decided when it is loaded.

On parallelcluster, either clusterflow runs where the storage is mounted (``scratch_dir`` is
``remote_root``, the run directory is shared with the ranks), or it runs anywhere and stages
through the cluster's FSx for Lustre (``flows.fsx_staging``); a spec fitting neither is
refused with what to change. On Batch the job stages its own data (``flows.batch_staging``).
No ``flows.spec`` import (the spec's validator calls this) and nothing heavy: the pipeline
imports it on every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flows.run_inputs import input_key
from infra.staging.fsx_layout import staging_problem


def shared_mount(spec: Any) -> bool:
    """clusterflow runs where the cluster's storage is mounted (scratch_dir is remote_root)."""
    return spec.scratch_dir.resolve() == Path(spec.parallelcluster.remote_root)


def uses_fsx(spec: Any) -> bool:
    """The parallelcluster backend run from elsewhere: stage through FSx (validated at load)."""
    return spec.backend == "parallelcluster" and not spec.steps and not shared_mount(spec)


def uses_batch_stager(spec: Any) -> bool:
    """A Batch run whose job stages its own data (``flows.batch_staging``)."""
    return spec.backend == "batch" and not spec.steps and not spec.reuse_result


def raw_config(spec: Any) -> dict[str, Any]:
    return yaml.safe_load(Path(spec.parallelcluster.config).read_text()) or {}


def fsx_refusal(spec: Any) -> str | None:
    """Why a parallelcluster spec can run neither on a shared mount nor through FSx."""
    if shared_mount(spec):
        return None
    root = spec.parallelcluster.remote_root
    where = (f"scratch_dir ({spec.scratch_dir}) is not the cluster's shared storage "
             f"parallelcluster.remote_root ({root})")
    if spec.steps:
        return (f"{where}, and steps: run on parallelcluster only from where that storage is "
                "mounted (FSx staging covers the single-kernel pipeline): set scratch_dir to "
                "remote_root and run on the head node")
    if spec.reuse_result:
        return (f"{where}, so the run stages through FSx, which does not support "
                "reuse_result yet: drop reuse_result or run on the head node")
    s = spec.storage
    keys = [input_key(spec)]
    problem = staging_problem(raw_config(spec), input_bucket=s.input_bucket,
                              input_keys=keys, results_bucket=s.results_bucket,
                              results_prefix=s.results_prefix, remote_root=root)
    if problem is None:
        return None
    return (f"{where}, and it cannot stage through FSx: {problem} in "
            f"{spec.parallelcluster.config}; fix that, or run clusterflow where the storage "
            "is mounted with scratch_dir equal to remote_root")
