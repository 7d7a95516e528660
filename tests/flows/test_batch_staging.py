"""The Batch pipeline with the stager inside the job, driven end to end on one "node".

moto's Batch completes jobs without running them, so the node is this machine: the provider
runs the Batch launcher's real command (``batch_mnp_entry.py`` as the main node of a 1-node
job, the venv's ``mpiexec``, real ranks) with the environment Batch would give it; the entry
stages through ``infra.staging.s3_job`` against the moto server, as the image would.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from flows.batch_staging import NODE_ROOT, run_through_batch
from flows.fsx_checks import uses_batch_stager
from flows.run_inputs import input_key
from flows.spec import DEFAULT_SPEC, load_spec
from infra.backends.launchers import find_mpiexec
from infra.backends.providers.base import JobHandle, JobState, JobStatus
from infra.backends.providers.batch import BatchMnpLauncher
from infra.backends.providers.local import LocalProvider
from infra.clusters.batch_config import load_batch_config
from infra.staging.fsx_run import VerifyError
from mpi_jobs.heat import reference_solution
from mpi_jobs.initial_conditions import heat_hotspots

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "cluster_configs" / "batch" / "mnp-c5n-efa.yaml"
LOG = logging.getLogger("test-batch-staging")


class OneNodeBatch(LocalProvider):
    """The main node of a 1-node MNP job, here: what Batch runs, with Batch's variables."""

    label = "batch (one local node)"

    def __init__(self, aws: Any, tmp_path: Path, after: Any = None) -> None:
        super().__init__()
        cfg = load_batch_config(CONFIG)
        mpirun = [find_mpiexec(), *(["--allow-run-as-root"] if os.geteuid() == 0 else [])]
        container = cfg.container.model_copy(update={
            "entry": [sys.executable, str(REPO / "infra/clusters/batch_mnp_entry.py"),
                      "--port", "0", "--hostfile", str(tmp_path / "hosts")],
            "mpirun": mpirun, "mpirun_args": ["--oversubscribe"], "python": sys.executable})
        self.config = cfg.model_copy(update={"container": container})
        self.aws, self.after = aws, after

    def launcher(self) -> BatchMnpLauncher:
        return BatchMnpLauncher(self.config)

    def submit(self, command: list[str], *, ranks: int, job_name: str, workdir: Path,
               env: dict[str, str] | None = None) -> JobHandle:
        batch = {"AWS_BATCH_JOB_NUM_NODES": "1", "AWS_BATCH_JOB_NODE_INDEX": "0",
                 "AWS_BATCH_JOB_MAIN_NODE_INDEX": "0", "CLUSTERFLOW_NODE_IP": "127.0.0.1",
                 "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": self.aws.endpoint_url,
                 "AWS_DEFAULT_REGION": self.aws.region}
        return super().submit(command, ranks=ranks, job_name=job_name, workdir=workdir,
                              env={**batch, **(env or {})})

    def status(self, job: JobHandle) -> JobStatus:
        status = super().status(job)
        if status.state is JobState.COMPLETED and self.after:
            self.after()
        return status


def _world(aws: Any, tmp_path: Path) -> tuple[Path, str]:
    results = f"bst-{uuid.uuid4().hex[:8]}"
    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    spec.update(kernel={"name": "heat", "parameters": {"nx": 20, "ny": 16, "steps": 9,
                                                       "alpha": 0.2}},
                backend="batch", ranks=2, scratch_dir=str(tmp_path / "local"),
                storage={"input_bucket": f"{results}-in", "results_bucket": results},
                batch={"config": str(CONFIG)})
    for b in (f"{results}-in", results):
        aws.client("s3").create_bucket(Bucket=b)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, results


def _run(aws: Any, tmp_path: Path, spec_path: Path, run_id: str, after: Any = None) -> Any:
    spec = load_spec(spec_path)
    assert uses_batch_stager(spec)

    @contextlib.contextmanager
    def open_backend(spec: Any, aws_: Any, logger: Any) -> Iterator[OneNodeBatch]:
        yield OneNodeBatch(aws, tmp_path, after)

    return run_through_batch(spec, aws, (spec.scratch_dir / run_id).resolve(), run_id, LOG,
                             lambda _, fn, *a: fn(*a), open_backend)


def _manifest_in_s3(aws: Any, bucket: str, run_id: str) -> bool:
    got = aws.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"runs/{run_id}/")
    return any(o["Key"].endswith("/manifest.json") for o in got.get("Contents", []))


def test_the_job_stages_its_own_data_and_the_manifest_follows_verification(aws, tmp_path):
    spec_path, results = _world(aws, tmp_path)
    run_id = f"heat-batch-{uuid.uuid4().hex[:6]}"
    published_early: list[bool] = []
    spec, staged, record, sent = _run(
        aws, tmp_path, spec_path, run_id,
        after=lambda: published_early.append(_manifest_in_s3(aws, results, run_id)))
    assert published_early and not any(published_early)  # not while the job was done
    assert _manifest_in_s3(aws, results, run_id)
    s3 = aws.client("s3")
    field = s3.get_object(Bucket=results, Key=f"runs/{run_id}/field.npy")["Body"].read()
    assert np.array_equal(np.load(io.BytesIO(field)),
                          reference_solution(heat_hotspots(16, 20), 9, 0.2))
    published = json.loads(s3.get_object(Bucket=results,
                                         Key=f"runs/{run_id}/manifest.json")["Body"].read())
    assert published == record["manifest"]
    assert next(f for f in published["files"] if f["name"] == "field.npy")["sha256"] == \
        hashlib.sha256(field).hexdigest()
    # the node read its own verified copy; nothing passed through this machine's scratch
    node_copy = Path(NODE_ROOT) / run_id / "in" / Path(input_key(spec)).name
    assert hashlib.sha256(node_copy.read_bytes()).hexdigest() == staged.sha256
    assert not (tmp_path / "local" / run_id / "in").exists()
    assert [t.uri.rsplit("/", 1)[1] for t in sent][-1] == "manifest.json"


def test_results_changed_in_s3_after_the_job_fail_the_run_unpublished(aws, tmp_path):
    spec_path, results = _world(aws, tmp_path)
    run_id = f"heat-batch-{uuid.uuid4().hex[:6]}"

    def tamper() -> None:
        aws.client("s3").put_object(Bucket=results, Key=f"runs/{run_id}/field.npy",
                                    Body=b"not the field")

    with pytest.raises(VerifyError, match=rf"runs/{run_id}/field.npy has sha256 \w+, not the"):
        _run(aws, tmp_path, spec_path, run_id, after=tamper)
    assert not _manifest_in_s3(aws, results, run_id)
