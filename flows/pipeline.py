"""The HPC pipeline as one Prefect flow: provision -> stage in -> MPI run -> publish -> consume.

Fan-out happens between publish and consume, inside AWS: the manifest upload raises an S3
event, an EventBridge rule filters it to the SNS topic, and the topic delivers to every queue.
The consume stage proves it by reading, verifying and acknowledging the event on each queue.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from event_bridge.consumer import consume_until
from event_bridge.topology import AppliedTopology, FanOutTopology, apply_topology
from flows.spec import DEFAULT_SPEC, PipelineSpec, load_spec
from infra.aws import AwsTarget
from infra.embedded_aws import aws_target
from infra.launchers import python_module
from infra.providers.base import JobState
from infra.providers.local import LocalProvider
from infra.staging import Transferred, download, exists, upload

MANIFEST = "manifest.json"


class MpiJobFailed(RuntimeError):
    """The MPI job exited non-zero; the message carries the failing rank's own error."""


def new_run_id(spec: PipelineSpec) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{spec.name}-{stamp}-{uuid.uuid4().hex[:6]}"


def ensure_bucket(aws: AwsTarget, bucket: str) -> None:
    s3 = aws.client("s3")
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("404", "NoSuchBucket", "NotFound"):
            raise
    kwargs: dict[str, Any] = {}
    if aws.region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": aws.region}
    s3.create_bucket(Bucket=bucket, **kwargs)


def fanout_topology(spec: PipelineSpec) -> FanOutTopology:
    return FanOutTopology(
        results_bucket=spec.storage.results_bucket,
        key_prefix=spec.storage.results_prefix,
        key_suffix=MANIFEST,
        topic=spec.fanout.topic,
        queues=tuple(spec.fanout.queues),
        max_receive_count=spec.fanout.max_receive_count,
        visibility_timeout=spec.fanout.visibility_timeout,
    )


@task(name="provision", cache_policy=NO_CACHE)
def provision(spec: PipelineSpec, aws: AwsTarget, run_dir: Path) -> AppliedTopology:
    """Buckets, the fan-out topology and the scratch dir; all idempotent."""
    logger = get_run_logger()
    for bucket in (spec.storage.input_bucket, spec.storage.results_bucket):
        ensure_bucket(aws, bucket)
    applied = apply_topology(aws, fanout_topology(spec))
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.info("provisioned on %s: rule %s -> topic %s -> queues %s", aws.label,
                applied.rule_arn, applied.topic_arn, ", ".join(applied.queue_urls))
    return applied


@task(name="stage_in", cache_policy=NO_CACHE)
def stage_in(spec: PipelineSpec, aws: AwsTarget, run_dir: Path) -> Transferred:
    """Fetch the kernel's input from S3 into scratch, generating and uploading it once."""
    from mpi_jobs.initial_conditions import heat_hotspots
    from mpi_jobs.manifest import atomic_save_npy

    logger = get_run_logger()
    p = spec.kernel.parameters
    bucket = spec.storage.input_bucket
    key = f"{spec.storage.input_prefix}heat-{p.ny}x{p.nx}.npy"
    if not exists(aws, bucket, key):
        generated = run_dir / "generated-input.npy"
        atomic_save_npy(generated, heat_hotspots(p.ny, p.nx))
        upload(aws, generated, bucket, key)
        generated.unlink()
        logger.info("generated the initial condition and uploaded it to s3://%s/%s", bucket, key)
    staged = download(aws, bucket, key, run_dir / "in" / "initial.npy")
    logger.info("staged %s (%d bytes, sha256 %s) to %s", staged.uri, staged.bytes,
                staged.sha256[:12], staged.path)
    return staged


def _forward(path: Path, offset: int, prefix: str, logger: Any) -> int:
    """Send the lines appended to ``path`` since ``offset`` to the Prefect log."""
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode(errors="replace").splitlines():
        if line.strip():
            logger.info("%s %s", prefix, line)
    return offset + end


def _rank_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    own = [ln for ln in lines if ": rank " in ln]
    return "; ".join(own) if own else "\n".join(lines[-15:])


@task(name="mpi_run", cache_policy=NO_CACHE)
def mpi_run(spec: PipelineSpec, input_path: Path, run_dir: Path) -> dict[str, Any]:
    logger = get_run_logger()
    p = spec.kernel.parameters
    out_dir = run_dir / "out"
    argv = python_module(
        f"mpi_jobs.{spec.kernel.name}", "--nx", str(p.nx), "--ny", str(p.ny),
        "--steps", str(p.steps), "--alpha", repr(p.alpha),
        "--in", str(input_path), "--out", str(out_dir),
    )
    provider = LocalProvider()
    command = provider.launcher().command(spec.ranks, argv)
    logger.info("launching on %s: %s", provider.label, " ".join(command))
    job = provider.submit(command, ranks=spec.ranks, job_name=spec.kernel.name, workdir=run_dir,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    offsets = {job.stdout: 0, job.stderr: 0}
    try:
        while True:
            status = provider.status(job)
            for path in offsets:
                offsets[path] = _forward(path, offsets[path], f"[{spec.kernel.name}]", logger)
            if status.state.terminal:
                break
            time.sleep(0.1)
    except BaseException:
        provider.cancel(job)  # a cancelled flow must not leave ranks running
        raise
    if status.state is not JobState.COMPLETED:
        raise MpiJobFailed(
            f"{spec.kernel.name} on {spec.ranks} ranks failed ({status.message}): "
            f"{_rank_error(job.stderr.read_text(errors='replace'))}"
        )
    return json.loads((out_dir / MANIFEST).read_text())


@task(name="publish", cache_policy=NO_CACHE)
def publish(spec: PipelineSpec, aws: AwsTarget, run_id: str, out_dir: Path,
            manifest: dict[str, Any]) -> list[Transferred]:
    """Upload the outputs, then the manifest last: its arrival is the 'results ready' event."""
    bucket, prefix = spec.storage.results_bucket, f"{spec.storage.results_prefix}{run_id}/"
    sent = [upload(aws, out_dir / f["name"], bucket, prefix + f["name"])
            for f in manifest["files"]]
    sent.append(upload(aws, out_dir / MANIFEST, bucket, prefix + MANIFEST))
    get_run_logger().info("published %d files to s3://%s/%s", len(sent), bucket, prefix)
    return sent


@task(name="consume", cache_policy=NO_CACHE)
def consume(aws: AwsTarget, applied: AppliedTopology, manifest_key: str) -> dict[str, Any]:
    """Each fan-out queue must deliver this run's manifest event, verified against S3."""
    logger = get_run_logger()
    reports = {}
    for queue, url in applied.queue_urls.items():
        report = consume_until(aws, queue, url, want_key=manifest_key)
        logger.info("queue %s: %d event(s) received, %d verified, %d left for redelivery",
                    queue, report.received, report.verified, len(report.failed))
        reports[queue] = asdict(report)
    return reports


@flow(name="hpc-pipeline", log_prints=True)
def hpc_pipeline(spec_path: str = str(DEFAULT_SPEC), ranks: int | None = None,
                 aws_mode: str | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Run one pipeline spec end to end and return the run's summary (see ``--json``)."""
    spec = load_spec(spec_path, ranks=ranks, aws=aws_mode)
    run_id = run_id or new_run_id(spec)
    run_dir = (spec.scratch_dir / run_id).resolve()
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds[name] = round(time.perf_counter() - t0, 3)

    with aws_target(spec.aws, spec.region) as aws:
        applied = timed("provision", provision, spec, aws, run_dir)
        staged = timed("stage_in", stage_in, spec, aws, run_dir)
        manifest = timed("mpi_run", mpi_run, spec, staged.path, run_dir)
        sent = timed("publish", publish, spec, aws, run_id, run_dir / "out", manifest)
        manifest_key = f"{spec.storage.results_prefix}{run_id}/{MANIFEST}"
        queues = timed("consume", consume, aws, applied, manifest_key)
        endpoint = aws.label

    field_entry = next(f for f in manifest["files"] if f["name"] == "field.npy")
    return {
        "run_id": run_id,
        "spec": spec.name,
        "backend": spec.backend,
        "ranks": spec.ranks,
        "kernel": spec.kernel.name,
        "aws": endpoint,
        "seconds": seconds,
        "bytes_staged": staged.bytes,
        "bytes_published": sum(t.bytes for t in sent),
        "field_sha256": field_entry["sha256"],
        "scratch_dir": str(run_dir),
        "s3": {
            "input": staged.uri,
            "results": f"s3://{spec.storage.results_bucket}/{spec.storage.results_prefix}"
                       f"{run_id}/",
            "objects": [t.uri for t in sent],
        },
        "fanout": {
            "rule": applied.rule_arn,
            "topic": applied.topic_arn,
            "queues": {q: {"events_received": r["received"], "verified": r["verified"],
                           "failed": len(r["failed"])} for q, r in queues.items()},
        },
    }
