"""The HPC pipeline as one Prefect flow: provision -> stage in -> MPI run -> publish -> consume.

Fan-out happens between publish and consume, inside AWS: the manifest upload raises an S3
event, an EventBridge rule filters it to the SNS topic, and the topic delivers to every queue.
The consume stage proves it by reading, verifying and acknowledging the event on each queue.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from event_bridge.consumer import consume_until
from event_bridge.topology import AppliedTopology, FanOutTopology
from event_bridge.topology_cache import ensure_topology
from flows import phase_clock
from flows.artifacts import publish_run_artifacts
from flows.backends import open_backend, requeues, slurm_provider
from flows.budget import budget_watch, check_budget
from flows.errors import KernelNeverStarted, MpiJobFailed, retry_condition
from flows.fsx_checks import uses_batch_stager, uses_fsx
from flows.joblog import failure_lines, forward
from flows.prefect_flow import flow
from flows.result_cache import result_cache_key
from flows.run_inputs import grid_for_shape, input_key
from flows.spec import DEFAULT_SPEC, PipelineSpec, SpecError, load_spec
from infra.aws.clients import AwsTarget
from infra.aws.embedded import aws_target, state_dir
from infra.backends.launchers import python_module
from infra.backends.providers.base import JobState, JobStatus
from infra.backends.providers.polling import Backoff, wait
from infra.backends.providers.spot import job_interruptions
from infra.backends.srun_guard import NOT_LAUNCHED_MARK
from infra.staging.objects import IntegrityError, Transferred, download, exists, upload
from infra.telemetry.job import telemetry_env

MANIFEST = "manifest.json"


def new_run_id(spec: PipelineSpec) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{spec.name}-{stamp}-{uuid.uuid4().hex[:6]}"


def ensure_bucket(aws: AwsTarget, bucket: str) -> None:
    """Create ``bucket`` unless it exists (the fabric's own idempotent create)."""
    from event_bridge.ensure_storage import ensure_bucket as ensure

    ensure(aws.client("s3"), bucket, aws.region, [])


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
    for bucket in dict.fromkeys((spec.storage.input_bucket, spec.storage.results_bucket)):
        ensure_bucket(aws, bucket)
    # An unchanged topology is only checked, not applied again (event_bridge.topology_cache).
    applied, changed = ensure_topology(aws, fanout_topology(spec), state_dir() / "topology")
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.info("%s on %s: rule %s -> topic %s -> queues %s",
                "provisioned" if changed else "checked the provisioned topology", aws.label,
                applied.rule_arn, applied.topic_arn, ", ".join(applied.queue_urls))
    return applied


def grid_from_input(spec: PipelineSpec, path: Path) -> PipelineSpec:
    """A heat spec with its grid set to an uploaded field's shape (re-validated: ranks fit).

    An uploaded initial field decides the grid; other kernels read their input as is.
    """
    if spec.kernel.name != "heat":
        return spec
    import numpy as np

    try:
        field = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SpecError(f"the heat input {path.name} is not a .npy array: {e}") from None
    return grid_for_shape(spec, tuple(field.shape), path.name)


@task(name="stage_in", cache_policy=NO_CACHE)
def stage_in(spec: PipelineSpec, aws: AwsTarget, run_dir: Path) -> Transferred:
    """Fetch the kernel's input from S3 into scratch, generating and uploading it once.

    A user's own input (``kernel.input_key``, or the on-upload deployment's key) must exist
    and carry a SHA-256 (an S3 additional checksum or ``sha256`` metadata); the generated
    sample is deterministic in the kernel's parameters, so its key names them.
    """
    logger = get_run_logger()
    info = spec.kernel_info
    bucket, key = spec.storage.input_bucket, input_key(spec)
    if spec.kernel.input_key is None and not exists(aws, bucket, key):
        generated = run_dir / f"generated-{Path(key).name}"
        info.make_input(spec.kernel.parameters, generated)
        upload(aws, generated, bucket, key)
        generated.unlink()
        logger.info("generated the %s input and uploaded it to s3://%s/%s", info.name,
                    bucket, key)
    staged = download(aws, bucket, key, run_dir / "in" / Path(key).name)
    logger.info("staged %s (%d bytes, sha256 %s) to %s", staged.uri, staged.bytes,
                staged.sha256[:12], staged.path)
    return staged


@task(name="mpi_run", cache_key_fn=result_cache_key, result_serializer="json")
def mpi_run(spec: PipelineSpec, aws: AwsTarget, input_path: Path, input_sha256: str,
            run_dir: Path, run_id: str) -> dict[str, Any]:
    """Run the kernel on ``spec.ranks`` ranks; a failed job raises with the rank's own error.

    With ``kernel.checkpoint_every`` the kernel checkpoints into the run directory, and a
    retry (``kernel.retries``) resumes from the newest complete checkpoint instead of step 0.
    Returns the manifest and the run that computed it: with ``reuse_result`` Prefect returns
    an earlier run's record for the same (kernel, parameters, input) without running.
    """
    logger = get_run_logger()
    info = spec.kernel_info
    out_dir = run_dir / "out"
    checkpoints = run_dir / "checkpoints" if spec.kernel.checkpoint_every else None
    # With requeue (Spot) the same script runs again after a reclaim: it must always resume.
    restart = checkpoints is not None and (requeues(spec, spec.backend) or (
        checkpoints.is_dir() and any(checkpoints.iterdir())))
    argv = python_module(info.module, *info.argv(
        spec.kernel.parameters, input_path, out_dir, checkpoint_dir=checkpoints,
        checkpoint_every=spec.kernel.checkpoint_every, restart=restart))
    if restart:
        logger.info("resuming %s from the checkpoints in %s", info.name, checkpoints)
    with open_backend(spec, aws, logger) as provider:
        command = provider.launcher().command(spec.ranks, argv)
        logger.info("launching on %s: %s", provider.label, " ".join(command))
        job = provider.submit(command, ranks=spec.ranks, job_name=info.name, workdir=run_dir,
                              env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                                   **telemetry_env(aws, run_id, spec.storage.results_bucket)})
        offsets = {job.stdout: 0, job.stderr: 0}

        def on_poll(_: JobStatus) -> None:
            for path in offsets:
                offsets[path] = forward(path, offsets[path], f"[{info.name}]", logger)

        # A local job is watched closely (it is seconds long and nobody else is asked); a
        # scheduler is a shared service and is polled with backoff.
        backoff = Backoff(first=0.1, cap=0.1) if spec.backend == "local" else Backoff()
        try:
            status = wait(provider, job, on_poll=on_poll, backoff=backoff)
        except BaseException:
            provider.cancel(job)  # a cancelled flow must not leave ranks running
            raise
    if status.state is not JobState.COMPLETED:
        err = job.stderr.read_text(errors="replace")
        raise (KernelNeverStarted if NOT_LAUNCHED_MARK in err else MpiJobFailed)(
            f"{info.name} on {spec.ranks} ranks failed ({status.message}): "
            f"{failure_lines(err)}"
        )
    if not (out_dir / MANIFEST).is_file():  # the kernel's last act: its ranks did not all run
        raise MpiJobFailed(
            f"{info.name} on {spec.ranks} ranks ended with exit code 0 but wrote no "
            f"{MANIFEST}, so its ranks did not run to the end: "
            f"{failure_lines(job.stderr.read_text(errors='replace')) or 'nothing on stderr'}")
    spot = job_interruptions(provider, job) or {"interruptions": 0, "seconds_lost": 0.0}
    return {"run_id": run_id, "manifest": json.loads((out_dir / MANIFEST).read_text()),
            "spot": spot}


# Without reuse_result: the same task with no cache key, so nothing is stored (with_options
# cannot drop a cache_key_fn, and persist_result=False on it warns on every run).
mpi_run_uncached = task(mpi_run.fn, name="mpi_run", cache_policy=NO_CACHE)


@task(name="fetch_result", cache_policy=NO_CACHE)
def fetch_result(spec: PipelineSpec, aws: AwsTarget, computed_by: str, manifest: dict[str, Any],
                 out_dir: Path) -> None:
    """The earlier run's published outputs into this run's out dir, each verified against
    the manifest's sha256 (and S3's own checksum on the way down)."""
    prefix = f"{spec.storage.results_prefix}{computed_by}/"
    for f in manifest["files"]:
        got = download(aws, spec.storage.results_bucket, prefix + f["name"], out_dir / f["name"])
        if got.sha256 != f["sha256"]:
            got.path.unlink()
            raise IntegrityError(f"{got.uri}: sha256 {got.sha256} is not the manifest's "
                                 f"{f['sha256']}")
    (out_dir / MANIFEST).write_text(json.dumps({**manifest, "reused_from": computed_by},
                                               indent=2) + "\n")
    get_run_logger().info("reused the result of run %s (same kernel, parameters and input)",
                          computed_by)


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
    """Each fan-out queue must deliver this run's manifest event, verified against S3.

    The queues are independent consumers, so they are read side by side (each one's long
    poll and verification would otherwise wait for the one before)."""
    logger = get_run_logger()
    queues = list(applied.queue_urls.items())
    with ThreadPoolExecutor(max_workers=len(queues) or 1,
                            thread_name_prefix="clusterflow-consume") as pool:
        futures = [pool.submit(consume_until, aws, queue, url, want_key=manifest_key)
                   for queue, url in queues]
        got = [f.result() for f in futures]  # the first queue's failure, in queue order
    reports = {}
    for (queue, _), report in zip(queues, got, strict=True):
        logger.info("queue %s: %d event(s) received, %d verified, %d left for redelivery",
                    queue, report.received, report.verified, len(report.failed))
        reports[queue] = asdict(report)
    return reports


@task(name="publish_manifest", cache_policy=NO_CACHE)
def publish_manifest(spec: PipelineSpec, aws: AwsTarget, run_id: str,
                     run_dir: Path) -> Transferred:
    """The run's manifest, last: its arrival is the 'results ready' event that fans out."""
    key = f"{spec.storage.results_prefix}{run_id}/{MANIFEST}"
    return upload(aws, run_dir / MANIFEST, spec.storage.results_bucket, key)


def steps_pipeline(spec: PipelineSpec, spec_path: Path, run_id: str,
                   run_dir: Path) -> dict[str, Any]:
    """A ``steps:`` spec: provision, the step graph, the run's manifest, fan-out, consume."""
    from flows.steps.flow import PipelineFailed, run_steps

    logger = get_run_logger()
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds[name] = round(time.perf_counter() - t0, 3)

    backends = {s.backend or spec.backend for s in spec.step_list()}
    if "slurm" in backends:
        slurm_provider(spec).ping()  # a Slurm that does not answer stops the run before AWS
    with aws_target(spec.aws, spec.region) as aws, \
            budget_watch(spec, spec_path, aws, logger.warning):
        applied = timed("provision", provision, spec, aws, run_dir)
        outcome = timed("steps", run_steps, spec, spec_path, aws, run_id, run_dir, logger,
                        timed)
        sent = timed("publish", publish_manifest, spec, aws, run_id, run_dir)
        queues = timed("consume", consume, aws, applied, f"{spec.storage.results_prefix}"
                       f"{run_id}/{MANIFEST}")
        endpoint = aws.label
    summary: dict[str, Any] = {
        "run_id": run_id, "spec": spec.name, "backend": spec.backend, "ranks": spec.ranks,
        "kernel": None, "aws": endpoint, "seconds": seconds,
        "state": outcome.manifest["state"],
        "result": MANIFEST, "result_sha256": sent.sha256,
        "computed_by": run_id, "scratch_dir": str(run_dir),
        "steps": outcome.manifest["steps"],
        "points": {"total": len(outcome.points), "failed": len(outcome.failed)},
        "s3": {"results": f"s3://{spec.storage.results_bucket}/{spec.storage.results_prefix}"
                          f"{run_id}/", "manifest": sent.uri},
        "fanout": {"rule": applied.rule_arn, "topic": applied.topic_arn,
                   "queues": {q: {"events_received": r["received"], "verified": r["verified"],
                                  "failed": len(r["failed"])} for q, r in queues.items()}},
    }
    summary["artifacts"] = publish_run_artifacts(spec, summary, aws)
    if outcome.failed:
        names = ", ".join(f"{p['step']}[{p['label']}]" if p["label"] else p["step"]
                          for p in outcome.failed)
        raise PipelineFailed(f"{len(outcome.failed)} of {len(outcome.points)} point(s) did not "
                             f"complete: {names}", summary)
    return summary


@flow(name="hpc-pipeline", log_prints=True,
      # Sweep points wait on the scheduler in their own threads (a Slurm array's points all
      # at once), so the pool must hold more than a handful.
      task_runner=ThreadPoolTaskRunner(max_workers=256))
def hpc_pipeline(spec_path: str | None = None, ranks: int | None = None,
                 aws_mode: str | None = None, run_id: str | None = None,
                 input_key: str | None = None, backend: str | None = None) -> dict[str, Any]:
    """Run one pipeline spec end to end and return the run's summary (see ``--json``).

    ``spec_path`` defaults to ``$CLUSTERFLOW_SPEC`` (the spec a ``clusterflow local up``
    stack runs), else the bundled spec. ``input_key``: an object in the spec's input bucket
    to run on instead of the generated sample (the on-upload deployment passes the uploaded
    key); for heat its shape sets the grid.
    """
    phase_clock.mark("flow-run creation")
    spec_path = spec_path or os.environ.get("CLUSTERFLOW_SPEC") or str(DEFAULT_SPEC)
    spec = load_spec(spec_path, ranks=ranks, aws=aws_mode, backend=backend)
    check_budget(spec, spec_path)  # a deployment's run is refused like the CLI's
    if input_key is not None:  # validated like the spec's own key; nothing else re-read
        kernel = type(spec.kernel).model_validate(
            {**spec.kernel.model_dump(), "input_key": input_key})
        spec = spec.model_copy(update={"kernel": kernel})
    run_id = run_id or new_run_id(spec)
    run_dir = (spec.scratch_dir / run_id).resolve()
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = round(time.perf_counter() - t0, 3)

    if spec.steps:
        return steps_pipeline(spec, Path(spec_path), run_id, run_dir)
    if spec.backend == "slurm":
        slurm_provider(spec).ping()  # a Slurm that does not answer stops the run before AWS
    with aws_target(spec.aws, spec.region) as aws, \
            budget_watch(spec, spec_path, aws, get_run_logger().warning):
        applied = timed("provision", provision, spec, aws, run_dir)
        if uses_fsx(spec):  # run from anywhere: only the ranks see the cluster's FSx
            from flows.fsx_staging import run_through_fsx

            spec, staged, record, sent = run_through_fsx(
                spec, aws, run_dir, run_id, get_run_logger(), timed, open_backend, tasks=True)
            manifest, computed_by = record["manifest"], record["run_id"]
        elif uses_batch_stager(spec):  # the stager inside the job (flows.batch_staging)
            from flows.batch_staging import run_through_batch

            spec, staged, record, sent = run_through_batch(
                spec, aws, run_dir, run_id, get_run_logger(), timed, open_backend, tasks=True)
            manifest, computed_by = record["manifest"], record["run_id"]
        else:
            staged = timed("stage_in", stage_in, spec, aws, run_dir)
            if spec.kernel.input_key is not None:
                spec = grid_from_input(spec, staged.path)
            # Only a reusable result needs its record stored.
            run = (mpi_run if spec.reuse_result else mpi_run_uncached).with_options(
                retries=spec.kernel.retries + 1,
                retry_condition_fn=retry_condition(spec.kernel.retries))
            record = timed("mpi_run", run, spec, aws, staged.path, staged.sha256, run_dir, run_id)
            manifest, computed_by = record["manifest"], record["run_id"]
            if computed_by != run_id:  # a cached record: the outputs are an earlier run's
                try:
                    timed("fetch_result", fetch_result, spec, aws, computed_by, manifest,
                          run_dir / "out")
                except (ClientError, IntegrityError) as e:
                    get_run_logger().warning("cannot reuse run %s (%s); computing again",
                                             computed_by, e)
                    record = timed("mpi_run", run.with_options(refresh_cache=True), spec, aws,
                                   staged.path, staged.sha256, run_dir, run_id)
                    manifest, computed_by = record["manifest"], record["run_id"]
            sent = timed("publish", publish, spec, aws, run_id, run_dir / "out", manifest)
        manifest_key = f"{spec.storage.results_prefix}{run_id}/{MANIFEST}"
        queues = timed("consume", consume, aws, applied, manifest_key)
        endpoint = aws.label

    main = spec.kernel_info.main_result
    main_entry = next(f for f in manifest["files"] if f["name"] == main)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "spec": spec.name,
        "backend": spec.backend,
        "ranks": spec.ranks,
        "kernel": spec.kernel.name,
        "aws": endpoint,
        "seconds": seconds,
        "bytes_staged": staged.bytes,
        "bytes_published": sum(t.bytes for t in sent),
        "result": main,
        "result_sha256": main_entry["sha256"],
        "computed_by": computed_by,
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
    if main == "field.npy":
        summary["field_sha256"] = main_entry["sha256"]
    if "spot" in record:  # requeues after node loss and the time their attempts ran
        summary["spot"] = record["spot"]
    summary["artifacts"] = publish_run_artifacts(spec, summary, aws)
    return summary
