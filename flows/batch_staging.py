"""The single-kernel pipeline on AWS Batch with the stager inside the job.

clusterflow runs anywhere and reads nothing of the nodes' disks: the job's environment tells
``infra/clusters/batch_mnp_entry.py`` what to stage (``infra.staging.s3_job``). Every node
downloads the input (SHA-256 checked) to its own disk before the ranks start; after ``mpirun``
succeeded the main node uploads the results (S3 checks each SHA-256 on receipt) and
``clusterflow-sums.json``. Then this flow reads the sums back, checks every result object in
S3 against them, and only then uploads ``manifest.json`` (the "results ready" event).

Checkpoints need storage that outlives a node: they go under the config's FSx mount when it
has one (``fsx.mount_point``), else on the main node's disk (a retry then starts at step 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.fsx_staging import MANIFEST, Timed, as_tasks, ensure_input, npy_shape, submit_and_wait
from flows.run_inputs import grid_for_shape
from infra.aws.clients import AwsTarget
from infra.backends.launchers import python_module
from infra.staging.fsx_job import SUMS
from infra.staging.fsx_run import VerifyError
from infra.staging.objects import Transferred, object_sha256, streamed_sha256, upload
from infra.staging.s3_job import STAGE_IN, STAGE_OUT
from infra.telemetry.job import telemetry_env

if TYPE_CHECKING:
    from flows.spec import PipelineSpec

NODE_ROOT = "/tmp/clusterflow"  # on every node's own disk


def run_job(spec: PipelineSpec, aws: AwsTarget, provider: Any, src: Transferred,
            run_dir: Path, run_id: str, logger: Any) -> None:
    info = spec.kernel_info
    node_dir = f"{NODE_ROOT}/{run_dir.name}"
    local_input = f"{node_dir}/in/{Path(src.uri).name}"
    fsx = getattr(provider.config, "fsx", None)
    checkpoints = None
    if spec.kernel.checkpoint_every:
        checkpoints = (f"{fsx.mount_point.rstrip('/')}/clusterflow/{run_dir.name}/checkpoints"
                       if fsx else f"{node_dir}/checkpoints")
    argv = python_module(info.module, *info.argv(
        spec.kernel.parameters, Path(local_input), Path(f"{node_dir}/out"),
        checkpoint_dir=Path(checkpoints) if checkpoints else None,
        checkpoint_every=spec.kernel.checkpoint_every, restart=checkpoints is not None))
    env = {**telemetry_env(aws, run_id, spec.storage.results_bucket),
           STAGE_IN: json.dumps([{"uri": src.uri, "path": local_input}]),
           STAGE_OUT: json.dumps({"dir": f"{node_dir}/out",
                                  "bucket": spec.storage.results_bucket,
                                  "prefix": f"{spec.storage.results_prefix}{run_id}/"})}
    submit_and_wait(spec, provider, provider.launcher().command(spec.ranks, argv), env,
                    run_dir, logger)


def verify_and_publish(spec: PipelineSpec, aws: AwsTarget, run_id: str, run_dir: Path,
                       logger: Any) -> tuple[dict[str, Any], list[Transferred]]:
    """The job's sums against the objects in S3, then the manifest, last."""
    bucket, prefix = spec.storage.results_bucket, f"{spec.storage.results_prefix}{run_id}/"
    s3 = aws.client("s3")
    try:
        record = json.loads(s3.get_object(Bucket=bucket, Key=prefix + SUMS)["Body"].read())
    except s3.exceptions.NoSuchKey:
        raise VerifyError(f"the job left no s3://{bucket}/{prefix}{SUMS}: its results were "
                          "not uploaded (see the job's log)") from None
    manifest, sums = record["manifest"], record["sha256"]
    if {f["name"]: f["sha256"] for f in manifest["files"]} != sums:
        raise VerifyError(f"s3://{bucket}/{prefix}{SUMS} disagrees with the kernel's manifest")
    sent, problems = [], []
    for entry in manifest["files"]:
        key = prefix + entry["name"]
        try:
            got = object_sha256(aws, bucket, key) or streamed_sha256(aws, bucket, key)[0]
        except s3.exceptions.ClientError:
            problems.append(f"s3://{bucket}/{key} is missing")
            continue
        if got != entry["sha256"]:
            problems.append(f"s3://{bucket}/{key} has sha256 {got}, not the job's "
                            f"{entry['sha256']}")
        sent.append(Transferred(f"s3://{bucket}/{key}", Path(entry["name"]),
                                int(entry.get("bytes", 0)), got))
    if problems:
        raise VerifyError(f"{len(problems)} result(s) in S3 do not match the job's sums: "
                          + "; ".join(problems))
    local = run_dir / "out" / MANIFEST
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(json.dumps(manifest, indent=2) + "\n")
    sent.append(upload(aws, local, bucket, prefix + MANIFEST))
    logger.info("%d result(s) verified by sha256 in s3://%s/%s; published the manifest",
                len(sent) - 1, bucket, prefix)
    return manifest, sent


def run_through_batch(spec: PipelineSpec, aws: AwsTarget, run_dir: Path, run_id: str,
                      logger: Any, timed: Timed, open_backend: Any, *, tasks: bool = False,
                      ) -> tuple[PipelineSpec, Transferred, dict[str, Any], list[Transferred]]:
    """Stage in (S3 only), run with the in-job stager, verify and publish."""
    stage = as_tasks(timed) if tasks else timed
    src = stage("stage_in", ensure_input, spec, aws, run_dir, logger)
    if spec.kernel.input_key is not None and spec.kernel.name == "heat":
        bucket, _, key = src.uri[len("s3://"):].partition("/")
        spec = grid_for_shape(spec, npy_shape(aws, bucket, key), Path(key).name)
    with open_backend(spec, aws, logger) as provider:
        stage("mpi_run", run_job, spec, aws, provider, src, run_dir, run_id, logger)
    manifest, sent = stage("publish", verify_and_publish, spec, aws, run_id, run_dir, logger)
    return spec, src, {"run_id": run_id, "manifest": manifest}, sent
